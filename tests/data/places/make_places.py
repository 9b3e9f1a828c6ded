#!/usr/bin/env python3
"""Make the Google Places sample answers that the tests and the bench serve from a fake Places.

    python3 tests/data/places/make_places.py            # (re)write the files beside this script
    python3 tests/data/places/make_places.py --check    # exit 1 if a file differs from its bytes

Standard library only (Python 3.11). The output is the same on every run: every random choice
comes from one generator seeded with a constant, drawn in a fixed order. Changing the order of
the draws, or adding one, changes every byte after it, and with it the expected bodies under
tests/data (rebuild them with tests/data/make_expected.py and make_new_as_legacy.py).

Every name, street, place id, photo reference, contributor id, page token and project number is
invented here. What is reproduced is the shape of Google's answers: which fields they carry and
how the bytes are laid out.

Legacy Nearby Search (maps.googleapis.com/maps/api/place/nearbysearch/json), written the way
JsonCpp's StyledWriter writes, which is what that service sends:
  * fields of a result: business_status, geometry.location.lat/.lng,
    geometry.viewport.northeast/.southwest, icon, icon_background_color, icon_mask_base_uri,
    name, opening_hours.open_now, photos[].height/.html_attributions/.photo_reference/.width,
    place_id, plus_code.compound_code/.global_code, price_level, rating, reference, scope,
    types, user_ratings_total, vicinity; around them html_attributions, next_page_token,
    results and status (and error_message in error answers);
  * a 3-space indentation step and `"key" : value` (a space on both sides of the colon);
  * the keys of every object in sorted order;
  * `[]` for an empty array; an array of scalars on one line, `[ a, b ]`, when that text is
    shorter than 74 characters (and it has fewer than 25 elements), otherwise one element per
    line; an array holding a non-empty object or array always one element per line;
  * numbers: integers as they are, doubles with %.16g (so a whole rating prints as `4`);
  * strings: `"` `\\` and control characters escaped, `<` and `>` written as \\u003c and \\u003e,
    `/` `&` and non-ASCII left as they are (raw UTF-8);
  * exactly one "\\n" after the closing brace.

Places API (New) (places.googleapis.com/v1/places:searchNearby), proto3 JSON as Google's front
end writes it:
  * fields of a place, in proto field-number order: id, types, formattedAddress,
    location.latitude/.longitude, rating (left out when unset, as proto3 does), displayName.text
    /.languageCode; an error is a google.rpc.Status (code, message, status, details with an
    ErrorInfo, a LocalizedMessage and a Help);
  * a 2-space indentation step and `"key": value`;
  * every non-empty array and object one element per line, `[]` and `{}` when empty;
  * doubles with %.15g when that reads back as the same double, else %.17g (coordinates are
    whole numbers of 1e-7 degrees times 1e-7, hence texts such as -118.44688029999999);
  * a "\\n" after the closing brace.

Files written (see README.md beside this script): the seven legacy bodies legacy_*.json, the two
New bodies new_ok_5.json and new_error_403.json, and three whole HTTP/1.1 responses
(*.chunked.http, *.content-length.http) whose bodies are byte for byte the .json files.

tests/data/make_expected.py and make_new_as_legacy.py import this file for legacy_text,
new_text and e7.
"""
from __future__ import annotations

import base64
import math
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# The two layouts


def _legacy_string(s: str) -> str:
    special = {'"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r',
               '\t': '\\t'}
    parts = []
    for ch in s:
        if ch in special:
            parts.append(special[ch])
        elif ch < ' ' or ch == '<' or ch == '>':
            parts.append('\\u%04x' % ord(ch))
        else:
            parts.append(ch)
    return '"' + ''.join(parts) + '"'


def _legacy_scalar(v) -> str:
    if v is None:
        return 'null'
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return '%.16g' % v
    if isinstance(v, str):
        return _legacy_string(v)
    raise TypeError('no legacy text for %r' % (v,))


LEGACY_STEP = '   '
LEGACY_MARGIN = 74  # an inline array must be shorter than this


def _legacy_one_line(items: list) -> str | None:
    """`[ a, b ]` when the array may stay on one line, else None."""
    if len(items) * 3 >= LEGACY_MARGIN:
        return None
    texts = []
    for item in items:
        if isinstance(item, (dict, list)):
            if item:
                return None
            texts.append('{}' if isinstance(item, dict) else '[]')
        else:
            texts.append(_legacy_scalar(item))
    width = len('[  ]') + len(', ') * (len(texts) - 1) + sum(len(t) for t in texts)
    return '[ ' + ', '.join(texts) + ' ]' if width < LEGACY_MARGIN else None


def _legacy_value(v, indent: str) -> str:
    """The text of `v`, which starts where the cursor is and whose inner lines use `indent`."""
    inner = indent + LEGACY_STEP
    if isinstance(v, dict):
        if not v:
            return '{}'
        members = ['\n' + inner + _legacy_string(k) + ' : ' + _legacy_value(v[k], inner)
                   for k in sorted(v)]
        return '{' + ','.join(members) + '\n' + indent + '}'
    if isinstance(v, list):
        if not v:
            return '[]'
        one_line = _legacy_one_line(v)
        if one_line is not None:
            return one_line
        return '[' + ','.join('\n' + inner + _legacy_value(x, inner) for x in v) + '\n' + indent + ']'
    return _legacy_scalar(v)


def legacy_text(doc) -> str:
    """`doc` as the legacy Nearby Search service writes it, with its one trailing newline."""
    return _legacy_value(doc, '') + '\n'


def _new_string(s: str) -> str:
    special = {'"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r',
               '\t': '\\t'}
    return '"' + ''.join(special.get(ch) or ('\\u%04x' % ord(ch) if ch < ' ' else ch)
                         for ch in s) + '"'


def _new_double(x: float) -> str:
    short = '%.15g' % x
    return short if float(short) == x else '%.17g' % x


def _new_value(v, indent: str) -> str:
    inner = indent + '  '
    if isinstance(v, dict):
        if not v:
            return '{}'
        members = [inner + _new_string(k) + ': ' + _new_value(x, inner) for k, x in v.items()]
        return '{\n' + ',\n'.join(members) + '\n' + indent + '}'
    if isinstance(v, list):
        if not v:
            return '[]'
        return '[\n' + ',\n'.join(inner + _new_value(x, inner) for x in v) + '\n' + indent + ']'
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _new_double(v)
    if isinstance(v, str):
        return _new_string(v)
    raise TypeError('no proto3 JSON text for %r' % (v,))


def new_text(doc) -> str:
    """`doc` (keys in the order given) as Places API (New) writes it, with its trailing newline."""
    return _new_value(doc, '') + '\n'


# ---------------------------------------------------------------------------------------------
# Invented values

SEED = 1312026
URL_SAFE = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
PLUS_DIGITS = '23456789CFGHJMPQRVWX'


def e7(degrees: float) -> int:
    """A coordinate as Google keeps it: a whole number of 1e-7 degrees."""
    return int(round(degrees * 1e7))


class Inventor:
    """Every random value of the samples, from one seeded generator."""

    def __init__(self) -> None:
        self.rng = random.Random(SEED)

    def token(self, length: int) -> str:
        return ''.join(self.rng.choice(URL_SAFE) for _ in range(length))

    def place_id(self) -> str:
        """27 characters with the layout of a real id of a point of interest: unpadded URL-safe
        base64 of a small protobuf, field 1 (tag 0x0a, 18 bytes) holding two fixed64 fields: an
        S2 cell (here somewhere in west Los Angeles, 0x80c2bc...) and a feature number. That is
        why real ids start with "ChIJ" and have an "R" at index 15."""
        cell = 0x80c2bc << 40 | self.rng.getrandbits(40)
        feature = self.rng.getrandbits(64)
        message = (b'\x0a\x12' + b'\x09' + cell.to_bytes(8, 'little')
                   + b'\x11' + feature.to_bytes(8, 'little'))
        text = base64.urlsafe_b64encode(message).decode('ascii').rstrip('=')
        assert len(text) == 27 and text.startswith('ChIJ') and text[15] == 'R'
        return text

    def viewport(self, lat: float, lng: float) -> dict:
        """About 0.00135 degrees either way of a point a little off the place."""
        shift_lat = self.rng.uniform(-0.00006, 0.00006)
        shift_lng = self.rng.uniform(-0.00008, 0.00008)
        half_lat = 0.0013498 + self.rng.uniform(-0.00001, 0.00001)
        half_lng = 0.0013498 + self.rng.uniform(-0.00001, 0.00001)
        ne_lat = lat + shift_lat + half_lat + self.rng.random() * 1e-12
        ne_lng = lng + shift_lng + half_lng + self.rng.random() * 1e-12
        sw_lat = lat + shift_lat - half_lat - self.rng.random() * 1e-12
        sw_lng = lng + shift_lng - half_lng - self.rng.random() * 1e-12
        return {'northeast': {'lat': ne_lat, 'lng': ne_lng},
                'southwest': {'lat': sw_lat, 'lng': sw_lng}}

    def photo(self) -> dict:
        width, height = self.rng.choice(PHOTO_SIZES)
        author = self.rng.choice(PHOTO_AUTHORS)
        contributor = '1' + ''.join(self.rng.choice('0123456789') for _ in range(20))
        reference = 'AZLasHq' + self.token(self.rng.randint(160, 230))
        link = '<a href="https://maps.google.com/maps/contrib/%s">%s</a>' % (contributor, author)
        return {'height': height, 'html_attributions': [link], 'photo_reference': reference,
                'width': width}


def plus_code(lat: float, lng: float) -> str:
    """The 10-digit Open Location Code of a point, "8553P2C4+V7" style."""
    lat = min(max(lat, -90.0), 90.0 - 1e-10) + 90.0
    lng = (lng + 180.0) % 360.0
    digits = []
    cell = 20.0
    for _ in range(5):
        row, col = int(lat // cell), int(lng // cell)
        lat -= row * cell
        lng -= col * cell
        digits += [PLUS_DIGITS[row], PLUS_DIGITS[col]]
        cell /= 20.0
    code = ''.join(digits)
    return code[:8] + '+' + code[8:]


# ---------------------------------------------------------------------------------------------
# What the samples say

TOWN = 'Arroyo Verde'  # invented
STATE = 'California'
ASKED_FROM = (34.068930, -118.445127)  # the location of the protocol's example IAMAT
METRES_PER_DEGREE = 111_320.0

PHOTO_SIZES = [(4032, 3024), (3024, 4032), (1920, 1080), (1600, 1200), (4000, 3000), (1080, 1350)]
PHOTO_AUTHORS = ['A Google User', 'Marisol Q.', 'Devon Hartwell', 'Priya N.',
                 'Theo Vanlandingham', 'J. Okafor', 'Kiki Saavedra', 'Lena Brandt']

ICON_BASE = 'https://maps.gstatic.com/mapfiles/place_api/icons/'
# kind of place: its icon, the icon's background and its pin
ICONS = {
    'geocode': ('geocode-71.png', '#7B9EB0', 'generic_pinlet'),
    'generic': ('generic_business-71.png', '#7B9EB0', 'generic_pinlet'),
    'school': ('school-71.png', '#7B9EB0', 'school_pinlet'),
    'restaurant': ('restaurant-71.png', '#FF9E67', 'restaurant_pinlet'),
    'cafe': ('cafe-71.png', '#FF9E67', 'cafe_pinlet'),
    'bar': ('bar-71.png', '#FF9E67', 'bar_pinlet'),
    'lodging': ('lodging-71.png', '#909CE1', 'hotel_pinlet'),
    'shopping': ('shopping-71.png', '#4B96F3', 'shopping_pinlet'),
    'park': ('park-71.png', '#4DB546', 'tree_pinlet'),
    'museum': ('museum-71.png', '#13B5C7', 'museum_pinlet'),
    'atm': ('atm-71.png', '#909CE1', 'atm_pinlet'),
}

POI = ['point_of_interest', 'establishment']
FOOD_POI = ['food'] + POI

# The 18 businesses of the legacy answer, in its order: name, kind, types, street address,
# price level (None: the field is left out), whether opening_hours is present, whether a photo is.
BUSINESSES = [
    ('Larkspur Hall Conference Center', 'school', POI, '405 Larkspur Ave', None, False, True),
    ('Bruin Bean Coffee Lab', 'cafe', ['cafe', 'food', 'point_of_interest', 'store', 'establishment'],
     '1100 Glenhollow Dr', 1, True, True),
    ('Westerly Noodle House', 'restaurant', ['restaurant'] + FOOD_POI, '1062 Tiverton Row', 2, True, True),
    ('Hotel Sagebrook', 'lodging', ['lodging', 'restaurant'] + FOOD_POI, '10740 Wilmont Blvd', None, False,
     True),
    ('Copperleaf Taqueria', 'restaurant', ['meal_takeaway', 'restaurant'] + FOOD_POI, '1033 Glenhollow Dr', 1,
     True, True),
    ('Mirador Sculpture Garden', 'park', ['park', 'tourist_attraction'] + POI, '245 Charlmont Dr', None, True,
     True),
    ("Dot's Corner Bakery", 'cafe', ['bakery', 'cafe', 'store'] + FOOD_POI, '1145 Alderbrook Ave', 1, True,
     True),
    ('Café Lumière Westside', 'cafe', ['cafe'] + FOOD_POI, '10919 Kinsale Ave', 2, True, True),
    ('Fenwick Museum of Maps', 'museum', ['museum'] + POI, '10899 Wilmont Blvd', None, True, True),
    ('Kestrel Bike & Board', 'shopping', ['bicycle_store', 'store'] + POI, '1321 Alderbrook Ave', 2, True,
     False),
    ('Palisade Credit Union ATM', 'atm', ['atm', 'finance'] + POI, '10960 Kinsale Ave', None, True, False),
    ('Saffron & Rye Kitchen', 'restaurant', ['restaurant'] + FOOD_POI, '1020 Tiverton Row', 3, True, True),
    ('The Hollow Oak Tavern', 'bar', ['bar', 'restaurant'] + FOOD_POI, '10847 Wilmont Blvd', 2, True, True),
    ('Verdant Row Books', 'shopping', ['book_store', 'store'] + POI, '1076 Glenhollow Dr', None, True, True),
    ('Arroyo Verde Inn & Suites', 'lodging', ['lodging'] + POI, '1260 Wilmont Blvd', None, False, True),
    ('Juniper Street Poke', 'restaurant', ['restaurant'] + FOOD_POI, '1115 Glenhollow Dr', 2, True, True),
    ('Summit Ridge Dental Arts', 'generic', ['dentist', 'health'] + POI, '10921 Wilmont Blvd #210', None,
     True, False),
    ('Bluejay Laundromat', 'generic', ['laundry'] + POI, '1347 Tiverton Row', None, True, False),
]

# The five places of the New answer: name, types, address, latitude, longitude, rating (None:
# unset, so left out).
NEW_PLACES = [
    ('Bruin Bean Coffee Lab',
     ['cafe', 'coffee_shop', 'food_store', 'food', 'point_of_interest', 'store', 'establishment'],
     '1100 Glenhollow Dr', 34.0696811, -118.4437092, 4.6),
    ('Westerly Noodle House', ['ramen_restaurant', 'japanese_restaurant', 'restaurant'] + FOOD_POI,
     '1062 Tiverton Row', 34.0627031, -118.4468803, 4.3),
    ('Café Lumière Westside', ['cafe', 'breakfast_restaurant', 'restaurant'] + FOOD_POI,
     '10919 Kinsale Ave', 34.0617745, -118.4439021, 4.5),
    ('Copperleaf Taqueria', ['mexican_restaurant', 'restaurant'] + FOOD_POI,
     '1033 Glenhollow Dr', 34.0634582, -118.4471309, 4.0),
    ('Juniper Street Poke', ['hawaiian_restaurant', 'restaurant'] + FOOD_POI,
     '1115 Glenhollow Dr', 34.0699412, -118.4451867, None),
]


def legacy_place(inv: Inventor, name: str, kind: str, types: list, vicinity: str, lat: float,
                 lng: float, business: bool, photo: bool) -> dict:
    icon, background, pin = ICONS[kind]
    pid = inv.place_id()
    place = {
        'geometry': {'location': {'lat': lat, 'lng': lng}, 'viewport': inv.viewport(lat, lng)},
        'icon': ICON_BASE + 'v1/png_71/' + icon,
        'icon_background_color': background,
        'icon_mask_base_uri': ICON_BASE + 'v2/' + pin,
        'name': name,
        'place_id': pid,
        'reference': pid,
        'scope': 'GOOGLE',
        'types': types,
        'vicinity': vicinity,
    }
    if business:
        code = plus_code(lat, lng)
        place['business_status'] = 'OPERATIONAL'
        place['plus_code'] = {'compound_code': '%s %s, %s' % (code[4:], TOWN, STATE),
                              'global_code': code}
    if photo:
        place['photos'] = [inv.photo()]
    return place


def legacy_ok(inv: Inventor) -> dict:
    """Twenty results, as an unfiltered Nearby Search gives them: the town, a neighbourhood,
    then businesses within about 1.2 km."""
    results = []
    areas = [
        (TOWN, ['locality', 'political'], 34.0612344, -118.4298765,
         (34.1473029384761, -118.3309488203477), (33.9781120746238, -118.5632047718815)),
        ('Glenhollow', ['neighborhood', 'political'], 34.0664417, -118.4447152,
         (34.07713291856022, -118.4319847203182), (34.05690618410933, -118.4580236197426)),
    ]
    for name, types, lat, lng, northeast, southwest in areas:
        lat, lng = e7(lat) / 1e7, e7(lng) / 1e7
        area = legacy_place(inv, name, 'geocode', types, TOWN, lat, lng, business=False, photo=True)
        # An area's viewport is its extent; the one drawn for it is dropped.
        area['geometry']['viewport'] = {
            'northeast': {'lat': northeast[0], 'lng': northeast[1]},
            'southwest': {'lat': southwest[0], 'lng': southwest[1]},
        }
        results.append(area)
    lat0, lng0 = ASKED_FROM
    for name, kind, types, street, price, has_hours, has_photo in BUSINESSES:
        metres = inv.rng.uniform(80, 1200)
        bearing = inv.rng.uniform(0, 2 * math.pi)
        north = metres * math.cos(bearing) / METRES_PER_DEGREE
        east = metres * math.sin(bearing) / (METRES_PER_DEGREE * math.cos(math.radians(lat0)))
        lat, lng = e7(lat0 + north) / 1e7, e7(lng0 + east) / 1e7
        rating = round(inv.rng.uniform(3.4, 4.9), 1)
        if inv.rng.random() < 0.15:
            rating = float(int(rating))  # a whole rating, which the layout prints as `4`
        ratings = inv.rng.randint(7, 2400)
        open_now = inv.rng.random() < 0.6 if has_hours else None
        place = legacy_place(inv, name, kind, types, street + ', ' + TOWN, lat, lng,
                             business=True, photo=has_photo)
        if open_now is not None:
            place['opening_hours'] = {'open_now': open_now}
        if price is not None:
            place['price_level'] = price
        place['rating'] = rating
        place['user_ratings_total'] = ratings
        results.append(place)
    assert len(results) == 20
    results_first = {'html_attributions': [], 'results': results, 'status': 'OK'}
    results_first['next_page_token'] = 'AZLasHq' + inv.token(409)
    return results_first


def new_ok(inv: Inventor) -> dict:
    """Five places for the field mask places.id,places.types,places.formattedAddress,
    places.location,places.rating,places.displayName; the last has no rating."""
    places = []
    for name, types, street, lat, lng, rating in NEW_PLACES:
        place = {
            'id': inv.place_id(),
            'types': types,
            'formattedAddress': '%s, %s, CA 90024, USA' % (street, TOWN),
            'location': {'latitude': e7(lat) * 1e-7, 'longitude': e7(lng) * 1e-7},
        }
        if rating is not None:
            place['rating'] = rating
        place['displayName'] = {'text': name, 'languageCode': 'en'}
        places.append(place)
    return {'places': places}


def new_error_403() -> dict:
    """What a key gets when Places API (New) is not enabled on its project."""
    project = '481516234200'
    console = ('https://console.developers.google.com/apis/api/places.googleapis.com/overview'
               '?project=' + project)
    message = ('Places API (New) has not been used in project ' + project + ' before or it is '
               'disabled. Enable it by visiting ' + console + ' then retry. If you enabled this '
               'API recently, wait a few minutes for the action to propagate to our systems and '
               'retry.')
    return {'error': {
        'code': 403,
        'message': message,
        'status': 'PERMISSION_DENIED',
        'details': [
            {'@type': 'type.googleapis.com/google.rpc.ErrorInfo', 'reason': 'SERVICE_DISABLED',
             'domain': 'googleapis.com',
             'metadata': {'service': 'places.googleapis.com', 'consumer': 'projects/' + project}},
            {'@type': 'type.googleapis.com/google.rpc.LocalizedMessage', 'locale': 'en-US',
             'message': message},
            {'@type': 'type.googleapis.com/google.rpc.Help',
             'links': [{'description': 'Google developers console API activation', 'url': console}]},
        ],
    }}


def legacy_error(status: str, message: str | None = None) -> dict:
    body = {'html_attributions': [], 'results': [], 'status': status}
    if message is not None:
        body['error_message'] = message
    return body


LEGACY_ERRORS = {
    'legacy_zero_results.json': legacy_error('ZERO_RESULTS'),
    'legacy_request_denied.json': legacy_error('REQUEST_DENIED', 'The provided API key is invalid.'),
    # What a key of a project made since 2025 gets from the legacy service.
    'legacy_request_denied_legacy_not_enabled.json': legacy_error(
        'REQUEST_DENIED',
        "You're calling a legacy API, which is not enabled for your project. To get newer features "
        "and more functionality, switch to the Places API (New) or Routes API. Learn more: "
        "https://developers.google.com/maps/legacy#LegacyApiNotActivatedMapError"),
    # Google's wording for a missing parameter; the exact text for this endpoint is a guess.
    'legacy_invalid_request.json': legacy_error(
        'INVALID_REQUEST', "Invalid request. Missing the 'location' parameter."),
    'legacy_over_query_limit.json': legacy_error(
        'OVER_QUERY_LIMIT',
        'You have exceeded your daily request quota for this API. If you did not set a custom '
        'daily request quota, verify your project has an active billing account: '
        'http://g.co/dev/maps-no-account'),
    'legacy_unknown_error.json': legacy_error('UNKNOWN_ERROR'),
}

# ---------------------------------------------------------------------------------------------
# Whole HTTP/1.1 responses, headers as Google's front ends send them (dates invented)

LEGACY_OK_HEAD = [
    'HTTP/1.1 200 OK',
    'Content-Type: application/json; charset=UTF-8',
    'Date: Tue, 03 Mar 2026 19:04:11 GMT',
    'Expires: Tue, 03 Mar 2026 19:09:11 GMT',
    'Cache-Control: public, max-age=300',
    'Vary: Accept-Language',
    'Server: scaffolding on HTTPServer2',
    'X-XSS-Protection: 0',
    'X-Frame-Options: SAMEORIGIN',
    'Server-Timing: gfet4t7; dur=87',
    'Alt-Svc: h3=":443"; ma=2592000,h3-29=":443"; ma=2592000',
    'Accept-Ranges: none',
    'Transfer-Encoding: chunked',
]

LEGACY_DENIED_HEAD = [
    'HTTP/1.1 200 OK',
    'Content-Type: application/json; charset=UTF-8',
    'Date: Tue, 03 Mar 2026 19:04:12 GMT',
    'Pragma: no-cache',
    'Expires: Fri, 01 Jan 1990 00:00:00 GMT',
    'Cache-Control: no-cache, must-revalidate',
    'Server: scaffolding on HTTPServer2',
    'X-XSS-Protection: 0',
    'X-Frame-Options: SAMEORIGIN',
]

NEW_OK_HEAD = [
    'HTTP/1.1 200 OK',
    'Content-Type: application/json; charset=UTF-8',
    'Vary: X-Origin',
    'Vary: Referer',
    'Vary: Origin,Accept-Encoding',
    'Date: Tue, 03 Mar 2026 19:04:13 GMT',
    'Server: ESF',
    'Cache-Control: private',
    'X-XSS-Protection: 0',
    'X-Frame-Options: SAMEORIGIN',
    'X-Content-Type-Options: nosniff',
    'Alt-Svc: h3=":443"; ma=2592000,h3-29=":443"; ma=2592000',
    'Transfer-Encoding: chunked',
]


def head(lines: list[str]) -> bytes:
    return ''.join(line + '\r\n' for line in lines + ['']).encode('ascii')


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """`body` in chunks of the given sizes, the rest in one more chunk, then the last chunk."""
    pieces = []
    start = 0
    for size in sizes + [len(body)]:
        piece = body[start:start + size]
        if piece:
            pieces.append(b'%x\r\n%s\r\n' % (len(piece), piece))
        start += len(piece)
    return b''.join(pieces) + b'0\r\n\r\n'


def samples() -> dict[str, bytes]:
    """Every file, by name."""
    inv = Inventor()  # the draws happen in this order: legacy answer, then New answer
    texts = {'legacy_ok_20.json': legacy_text(legacy_ok(inv))}
    texts.update((name, legacy_text(body)) for name, body in LEGACY_ERRORS.items())
    texts['new_ok_5.json'] = new_text(new_ok(inv))
    texts['new_error_403.json'] = new_text(new_error_403())
    files = {name: text.encode('utf-8') for name, text in texts.items()}

    legacy_ok_body = files['legacy_ok_20.json']
    files['legacy_ok_20.chunked.http'] = (
        head(LEGACY_OK_HEAD) + chunked(legacy_ok_body, [0x55b, 0x2000, 0x1000, 0x1000]))
    denied = files['legacy_request_denied.json']
    files['legacy_request_denied.content-length.http'] = (
        head(LEGACY_DENIED_HEAD + ['Content-Length: %d' % len(denied)]) + denied)
    files['new_ok_5.chunked.http'] = head(NEW_OK_HEAD) + chunked(files['new_ok_5.json'], [0x200, 0x800])
    return files


def main(argv: list[str]) -> int:
    if argv not in ([], ['--check']):
        print('usage: make_places.py [--check]', file=sys.stderr)
        return 2
    differ = []
    for name, data in samples().items():
        path = HERE / name
        if argv:
            if not path.exists() or path.read_bytes() != data:
                differ.append(name)
        else:
            path.write_bytes(data)
            print('%8d  %s' % (len(data), name))
    for name in differ:
        print('differs from what make_places.py makes: %s' % name, file=sys.stderr)
    return 1 if differ else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
