#!/usr/bin/env python3
"""Write the expected bodies of src/legacy.rs's tests: Places API (New) answers turned into
legacy Nearby Search bodies.

Run from the repository root:  python3 tests/data/make_new_as_legacy.py

This is an oracle independent of the herd's code. It parses the New API samples of
tests/data/places with Python's json module (exact decimal-to-double conversion), applies the
mapping documented in src/legacy.rs to plain Python dicts, and writes them with the sample
generator's own legacy_text (Google's legacy JsonCpp style). The writer's trailing "\\n" is
kept: the newline rules of docs/protocol.md section 4 are applied later, by places.rs.

Outputs (tests/data/):
  new_as_legacy_{0,1,3,5}.json    new_ok_5.json with the results cut to 0, 1, 3, 5
  new_as_legacy_full_input.json   an invented New answer with every mapped field (ESF layout)
  new_as_legacy_full.json         the legacy body made from it
  new_as_legacy_error_403.json    new_error_403.json as a legacy error body
"""
import json
import os
import sys

sys.dont_write_bytecode = True

OUT = os.path.dirname(os.path.abspath(__file__))
PLACES = os.path.join(OUT, 'places')

sys.path.insert(0, PLACES)
import make_places  # noqa: E402  (the samples' own writers)

PRICE_LEVELS = {
    'PRICE_LEVEL_FREE': 0,
    'PRICE_LEVEL_INEXPENSIVE': 1,
    'PRICE_LEVEL_MODERATE': 2,
    'PRICE_LEVEL_EXPENSIVE': 3,
    'PRICE_LEVEL_VERY_EXPENSIVE': 4,
}

ERROR_STATUSES = {
    'PERMISSION_DENIED': 'REQUEST_DENIED',
    'UNAUTHENTICATED': 'REQUEST_DENIED',
    'RESOURCE_EXHAUSTED': 'OVER_QUERY_LIMIT',
    'INVALID_ARGUMENT': 'INVALID_REQUEST',
}


def is_str(v):
    return isinstance(v, str)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_bool(v):
    return isinstance(v, bool)


def is_obj(v):
    return isinstance(v, dict)


def lat_lng(v):
    # google.type.LatLng has plain proto3 doubles: a coordinate of 0 is left out.
    lat = v.get('latitude', 0)
    lng = v.get('longitude', 0)
    if not (is_num(lat) and is_num(lng)):
        return None
    return {'lat': lat, 'lng': lng}


def open_now(p):
    for key in ('currentOpeningHours', 'regularOpeningHours'):
        hours = p.get(key)
        if is_obj(hours) and is_bool(hours.get('openNow')):
            return hours['openNow']
    return None


def legacy_place(p):
    r = {}
    status = p.get('businessStatus')
    if is_str(status) and status != 'BUSINESS_STATUS_UNSPECIFIED':
        r['business_status'] = status
    geometry = {}
    if is_obj(p.get('location')):
        location = lat_lng(p['location'])
        if location is not None:
            geometry['location'] = location
    viewport = p.get('viewport')
    if is_obj(viewport) and is_obj(viewport.get('high')) and is_obj(viewport.get('low')):
        northeast, southwest = lat_lng(viewport['high']), lat_lng(viewport['low'])
        if northeast is not None and southwest is not None:
            geometry['viewport'] = {'northeast': northeast, 'southwest': southwest}
    if geometry:
        r['geometry'] = geometry
    if is_str(p.get('iconBackgroundColor')):
        r['icon_background_color'] = p['iconBackgroundColor']
    if is_str(p.get('iconMaskBaseUri')):
        r['icon_mask_base_uri'] = p['iconMaskBaseUri']
    name = p.get('displayName')
    if is_obj(name) and is_str(name.get('text')):
        r['name'] = name['text']
    now = open_now(p)
    if now is not None:
        r['opening_hours'] = {'open_now': now}
    if is_str(p.get('id')):
        r['place_id'] = p['id']
        r['reference'] = p['id']
    plus = p.get('plusCode')
    if is_obj(plus):
        code = {}
        if is_str(plus.get('compoundCode')):
            code['compound_code'] = plus['compoundCode']
        if is_str(plus.get('globalCode')):
            code['global_code'] = plus['globalCode']
        if code:
            r['plus_code'] = code
    if p.get('priceLevel') in PRICE_LEVELS:
        r['price_level'] = PRICE_LEVELS[p['priceLevel']]
    if is_num(p.get('rating')):
        r['rating'] = p['rating']
    types = p.get('types')
    if isinstance(types, list) and all(is_str(t) for t in types):
        r['types'] = types
    if is_num(p.get('userRatingCount')):
        r['user_ratings_total'] = p['userRatingCount']
    if is_str(p.get('shortFormattedAddress')):
        r['vicinity'] = p['shortFormattedAddress']
    elif is_str(p.get('formattedAddress')):
        r['vicinity'] = p['formattedAddress']
    return r


def new_to_legacy(new, bound):
    body = {'html_attributions': [], 'results': []}
    if 'error' in new:
        error = new['error'] if is_obj(new['error']) else {}
        body['status'] = ERROR_STATUSES.get(error.get('status'), 'UNKNOWN_ERROR')
        if is_str(error.get('message')):
            body['error_message'] = error['message']
        return body
    places = new.get('places', [])
    assert isinstance(places, list) and all(is_obj(p) for p in places)
    if not places:
        body['status'] = 'ZERO_RESULTS'
        return body
    body['results'] = [legacy_place(p) for p in places[:bound]]
    body['status'] = 'OK'
    return body


def e7(x):
    return make_places.e7(x) * 1e-7


def full_input():
    """An invented New answer (proto field order) with every field the mapping reads."""
    return {'places': [
        {
            'name': 'places/ChIJw3JuqVi8woARm1fCbBDZ0hE',
            'id': 'ChIJw3JuqVi8woARm1fCbBDZ0hE',
            'types': ['french_restaurant', 'cafe', 'coffee_shop', 'restaurant', 'food',
                      'point_of_interest', 'establishment'],
            'formattedAddress': '10932 Kinsale Ave, Arroyo Verde, CA 90024, USA',
            'plusCode': {'globalCode': '8553P2C4+V7', 'compoundCode': 'P2C4+V7 Arroyo Verde, California'},
            'location': {'latitude': e7(34.0697221), 'longitude': e7(-118.4443189)},
            'viewport': {'low': {'latitude': 34.068399419708497, 'longitude': -118.4456678802915},
                         'high': {'latitude': 34.071097380291502, 'longitude': -118.44296991970851}},
            'rating': 4.7,
            'googleMapsUri': 'https://maps.google.com/?cid=1288194624112298341',
            'regularOpeningHours': {'openNow': False, 'weekdayDescriptions': ['Monday: Closed']},
            'businessStatus': 'OPERATIONAL',
            'priceLevel': 'PRICE_LEVEL_VERY_EXPENSIVE',
            'userRatingCount': 1874,
            'iconMaskBaseUri': 'https://maps.gstatic.com/mapfiles/place_api/icons/v2/cafe_pinlet',
            'iconBackgroundColor': '#FF9E67',
            'displayName': {'text': 'Crêperie <Lune> & "Sœurs" \\ 月の家 🥞\ttab\x01/',
                            'languageCode': 'fr'},
            'currentOpeningHours': {'openNow': True, 'periods': [{'open': {'day': 1, 'hour': 8}}]},
            'shortFormattedAddress': '10932 Kinsale Ave, Arroyo Verde',
            'photos': [{'name': 'places/ChIJw3JuqVi8woARm1fCbBDZ0hE/photos/AXCi2Q',
                        'widthPx': 4032, 'heightPx': 3024}],
        },
        {
            'id': 'ChIJb9M0d1C8woAR6c7DqQ0m1zE',
            'types': ['park', 'point_of_interest', 'establishment'],
            'formattedAddress': '245 Charlmont Dr, Arroyo Verde, CA 90024, USA',
            'location': {'latitude': e7(34.0711836), 'longitude': e7(-118.4489917)},
            'rating': 4,
            'regularOpeningHours': {'openNow': False},
            'businessStatus': 'CLOSED_TEMPORARILY',
            'priceLevel': 'PRICE_LEVEL_FREE',
            'userRatingCount': 12,
            'displayName': {'text': 'Mirador Sculpture Garden', 'languageCode': 'en'},
            'currentOpeningHours': {'weekdayDescriptions': []},
        },
        {
            'id': 'ChIJ3c0u8Ve8woARnS1oY2h0Zg4',
            'types': [],
            'location': {'longitude': e7(0.0000123)},
            'rating': 5,
            'businessStatus': 'BUSINESS_STATUS_UNSPECIFIED',
            'priceLevel': 'PRICE_LEVEL_UNSPECIFIED',
            'currentOpeningHours': {'openNow': False},
        },
    ]}


def read(path):
    with open(path, encoding='utf-8', newline='') as f:
        return f.read()


def write(name, text):
    with open(os.path.join(OUT, name), 'w', encoding='utf-8', newline='') as f:
        f.write(text)


def main():
    new_raw = read(os.path.join(PLACES, 'new_ok_5.json'))
    new = json.loads(new_raw)
    assert make_places.new_text(new) == new_raw, 'ESF writer does not round-trip'
    assert len(new['places']) == 5
    for bound in (0, 1, 3, 5):
        write('new_as_legacy_%d.json' % bound, make_places.legacy_text(new_to_legacy(new, bound)))

    full_raw = make_places.new_text(full_input())
    write('new_as_legacy_full_input.json', full_raw)
    write('new_as_legacy_full.json', make_places.legacy_text(new_to_legacy(json.loads(full_raw), 20)))

    error = json.loads(read(os.path.join(PLACES, 'new_error_403.json')))
    write('new_as_legacy_error_403.json', make_places.legacy_text(new_to_legacy(error, 5)))

    # An answer without places is the legacy sample's ZERO_RESULTS body, byte for byte.
    zero = read(os.path.join(PLACES, 'legacy_zero_results.json'))
    assert make_places.legacy_text(new_to_legacy({}, 5)) == zero
    assert make_places.legacy_text(new_to_legacy({'places': []}, 5)) == zero


if __name__ == '__main__':
    main()
