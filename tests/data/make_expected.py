#!/usr/bin/env python3
"""Write the expected WHATSAT bodies of tests/whatsat.rs.

Run from the repository root:  python3 tests/data/make_expected.py

This is an oracle independent of the herd's code: it parses Google's full
responses (the samples in tests/data/places), cuts the results array with
Python, and re-serialises them with the sample generator's own writers
(make_places.legacy_text: Google's legacy JsonCpp style; make_places.new_text:
the Places API (New) style). It first checks that re-serialising an uncut
sample reproduces it byte for byte, so the writers are faithful to the bytes
Google sends.

docs/protocol.md section 4: the reply body is Google's JSON with the results
array cut to `bound` entries, every run of two or more newlines replaced by
one, and the trailing newlines removed.
"""
import json
import os
import re
import sys

sys.dont_write_bytecode = True

OUT = os.path.dirname(os.path.abspath(__file__))
PLACES = os.path.join(OUT, 'places')

sys.path.insert(0, PLACES)
import make_places  # noqa: E402  (the samples' own writers)


def read(name):
    with open(os.path.join(PLACES, name), encoding='utf-8', newline='') as f:
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
    assert make_places.legacy_text(legacy) == legacy_raw, 'legacy writer does not round-trip'
    assert len(legacy['results']) == 20

    new_raw = read('new_ok_5.json')
    new = json.loads(new_raw)
    assert make_places.new_text(new) == new_raw, 'ESF writer does not round-trip'
    assert len(new['places']) == 5

    for bound in (0, 1, 5, 20):
        cut = dict(legacy)
        cut['results'] = legacy['results'][:bound]
        write('legacy_cut_%d.json' % bound, newline_rules(make_places.legacy_text(cut)))

    for bound in (0, 1, 3, 5):
        cut = dict(new)
        cut['places'] = new['places'][:bound]
        write('new_cut_%d.json' % bound, newline_rules(make_places.new_text(cut)))


if __name__ == '__main__':
    main()
