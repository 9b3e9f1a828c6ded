#!/usr/bin/env python3
"""Write the expected WHATSAT bodies of tests/whatsat.rs.

Run from the repository root:  python3 tests/data/make_expected.py

This is an oracle independent of the herd's code: it parses Google's full
responses (the fixtures in ../shared/places-fixtures), cuts the results array
with Python, and re-serialises them with the fixture generator's own writers
(legacy_dumps: Google's legacy JsonCpp style; esf_dumps: the Places API (New)
style). It first checks that re-serialising an uncut fixture reproduces it byte
for byte, so the writers are faithful to the bytes Google sends.

SPEC section 4: the reply body is Google's JSON with the results array cut to
`bound` entries, every run of two or more newlines replaced by one, and the
trailing newlines removed.
"""
import json
import os
import re
import sys

sys.dont_write_bytecode = True

ROOT = os.getcwd()
FIXTURES = os.path.join(ROOT, '..', 'shared', 'places-fixtures')
OUT = os.path.join(ROOT, 'tests', 'data')

sys.path.insert(0, FIXTURES)
import gen_fixtures  # noqa: E402  (the fixtures' own writers)


def read(name):
    with open(os.path.join(FIXTURES, name), encoding='utf-8', newline='') as f:
        return f.read()


def newline_rules(text):
    text = re.sub('\n\n+', '\n', text)
    return text.rstrip('\n')


def write(name, text):
    with open(os.path.join(OUT, name), 'w', encoding='utf-8', newline='') as f:
        f.write(text)


def main():
    # json.loads keeps key order (dicts are ordered), keeps whole numbers as
    # ints and fractional ones as floats, which is what both writers need.
    legacy_raw = read('legacy_ok_20.json')
    legacy = json.loads(legacy_raw)
    assert gen_fixtures.legacy_dumps(legacy) == legacy_raw, 'legacy writer does not round-trip'
    assert len(legacy['results']) == 20

    new_raw = read('new_ok_5.json')
    new = json.loads(new_raw)
    assert gen_fixtures.esf_dumps(new) + '\n' == new_raw, 'ESF writer does not round-trip'
    assert len(new['places']) == 5

    for bound in (0, 1, 5, 20):
        cut = dict(legacy)
        cut['results'] = legacy['results'][:bound]
        write('legacy_cut_%d.json' % bound, newline_rules(gen_fixtures.legacy_dumps(cut)))

    for bound in (0, 1, 3, 5):
        cut = dict(new)
        cut['places'] = new['places'][:bound]
        write('new_cut_%d.json' % bound, newline_rules(gen_fixtures.esf_dumps(cut) + '\n'))


if __name__ == '__main__':
    main()
