#!/usr/bin/env python3
"""Write the seed corpora of the fuzz harnesses (corpus/<harness>/) from
schemas/examples, schemas/invalid and hand-made edge frames. Run it from
anywhere after changing the schemas; the files it writes are committed.
It carries its own small MessagePack encoder (Debian's python3 has none
by default) so it can also write odd but valid encodings."""
import json
import os
import re
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def pack(v, float32=False):
    """MessagePack of a JSON value: smallest ints, float64 (or float32)."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if 0 <= v < 256:
            return b"\xcc" + bytes([v])
        if 0 <= v < 65536:
            return b"\xcd" + struct.pack(">H", v)
        if -128 <= v < 0:
            return b"\xd0" + struct.pack(">b", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        if float32:
            return b"\xca" + struct.pack(">f", v)
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        if len(b) < 256:
            return b"\xd9" + bytes([len(b)]) + b
        return b"\xda" + struct.pack(">H", len(b)) + b
    if isinstance(v, list):
        head = (bytes([0x90 | len(v)]) if len(v) < 16
                else b"\xdc" + struct.pack(">H", len(v)))
        return head + b"".join(pack(x, float32) for x in v)
    if isinstance(v, dict):
        head = (bytes([0x80 | len(v)]) if len(v) < 16
                else b"\xde" + struct.pack(">H", len(v)))
        return head + b"".join(pack(k) + pack(x, float32)
                               for k, x in v.items())
    raise TypeError(type(v))


def load(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return json.load(f)


def submit(referral, n):
    return {"v": 1, "cmd": "SUBMIT", "cid": "c-%d" % n,
            "idempotency_key": "seed-%d" % n, "referral": referral}


def write(harness, name, data):
    d = os.path.join(HERE, "corpus", harness)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


EXAMPLES = sorted(os.listdir(os.path.join(ROOT, "schemas", "examples")))
INVALID = ["age-string.json", "age-fraction.json", "birth-date-not-a-day.json",
           "forms-repeated.json", "misspelt-field-reported-first.json",
           "root-not-object.json", "summary-too-long-unicode.json",
           "unknown-field-not-identifier.json", "indicators-too-many.json"]

EDGES = {
    "array32-max": b"\xdd\xff\xff\xff\xff",
    "map32-max": b"\xdf\xff\xff\xff\xff",
    "str32-max": b"\xdb\xff\xff\xff\xff",
    "array16-short": b"\xdc\x00\x03\x01\x02",
    "nest-16": b"\x91" * 16 + b"\xc0",
    "nest-17": b"\x91" * 17 + b"\xc0",
    "unused-c1": b"\xc1",
    "bin8": b"\x81\xa1b\xc4\x02ab",
    "fixext1": b"\xd4\x01\x00",
    "uint64-above-int64": b"\xcf\x80\x00\x00\x00\x00\x00\x00\x00",
    "int64-min": b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    "float64-nan": b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    "float32-inf": b"\xca\x7f\x80\x00\x00",
    "float32-odd": b"\x92\xca\x3d\xcc\xcc\xcd\xca\x80\x00\x00\x00",
    "nonminimal-ints": b"\x93\xcd\x00\x01\xce\x00\x00\x00\x02\xd1\xff\xff",
    "duplicate-key": b"\x82\xa1a\x01\xa1a\x02",
    "int-key": b"\x81\x01\x02",
    "utf8-overlong": b"\xa2\xc0\xaf",
    "utf8-surrogate": b"\xa3\xed\xa0\x80",
    "str-nul": b"\xa3a\x00b",
    "trailing-byte": b"\xc0\xc0",
    "key-not-identifier": b"\x81\xa3a b\x81\xa3x.y\x90",
}

for f in ("decode", "intake", "schema", "rules"):
    shutil.rmtree(os.path.join(HERE, "corpus", f), ignore_errors=True)

for i, name in enumerate(EXAMPLES):
    ref = load("schemas/examples/" + name)
    base = name[:-len(".json")]
    write("schema", base + ".json", json.dumps(ref, ensure_ascii=False))
    write("intake", base + ".mp", pack(submit(ref, i)))
    if i < 2:
        write("decode", base + ".mp", pack(submit(ref, i)))
# The same referral with its numbers as float32.
ref = load("schemas/examples/" + EXAMPLES[0])
write("decode", "submit-float32.mp", pack(submit(ref, 9), float32=True))


def whole_floats(v):
    """v with every integer a float of the same value (120 as 120.0)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return float(v)
    if isinstance(v, list):
        return [whole_floats(x) for x in v]
    if isinstance(v, dict):
        return {k: whole_floats(x) for k, x in v.items()}
    return v


# Whole numbers sent as floats, and a negative zero: the canonical JSON
# writes them as integers.
write("intake", "submit-whole-floats.mp",
      pack(submit(whole_floats(ref), 10)))
write("intake", "submit-negative-zero.mp",
      pack(submit(dict(ref, x=[-0.0, 1e300]), 11)))

for i, name in enumerate(INVALID):
    ref = load("schemas/invalid/" + name)
    base = "invalid-" + name[:-len(".json")]
    write("schema", base + ".json", json.dumps(ref, ensure_ascii=False))
    if i < 4 or name == "root-not-object.json":
        write("intake", base + ".mp", pack(submit(ref, 100 + i)))

for name, data in EDGES.items():
    write("decode", name, data)

full = pack(submit(load("schemas/examples/" + EXAMPLES[0]), 1))
write("intake", "truncated.mp", full[: len(full) // 2])
write("intake", "array32-max", EDGES["array32-max"])
write("intake", "status.mp", pack({"v": 1, "cmd": "STATUS", "cid": "s-1",
      "referral_id": "6f1c2e1a-8a55-4b53-9c55-0a3f3f0f6f2b"}))
write("intake", "ping.mp", pack({"v": 1, "cmd": "PING", "cid": "p-1"}))
write("intake", "version-2.mp", pack({"v": 2, "cmd": "PING", "cid": "p-2"}))
write("intake", "reply-as-request.mp",
      pack({"v": 1, "cmd": "ACCEPTED", "cid": "a-1", "duplicate": False}))
write("intake", "unknown-field.mp",
      pack({"v": 1, "cmd": "PING", "cid": "p-3", "e-mail adres": "x"}))

# The rules: the default file and every malformed one of the tests.
with open(os.path.join(ROOT, "schemas", "rules", "default.yaml"), "rb") as f:
    write("rules", "default.yaml", f.read())
INVALID_RULES = os.path.join(ROOT, "schemas", "rules", "invalid")
for name in sorted(os.listdir(INVALID_RULES)):
    if name.endswith(".yaml"):
        with open(os.path.join(INVALID_RULES, name), "rb") as f:
            write("rules", "invalid-" + name, f.read())


def words(node, out):
    """Property names and string enum/const values of a schema."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "properties":
                out.update(v.keys())
            if k in ("enum", "const"):
                out.update(x for x in (v if k == "enum" else [v])
                           if isinstance(x, str))
            words(v, out)
    elif isinstance(node, list):
        for x in node:
            words(x, out)


names = set()
words(load("schemas/referral.v1.json"), names)
with open(os.path.join(HERE, "schema.dict"), "w", encoding="ascii") as f:
    f.write("# Field names and enum values of schemas/referral.v1.json,\n"
            "# written by make_seeds.py.\n")
    for w in sorted(names):
        if re.fullmatch("[A-Z]{2}", w) and w not in ("NL", "BE", "PL"):
            continue  # the country list would swamp the rest
        f.write("%s\n" % json.dumps(json.dumps(w)))
    for w in ("true", "false", "null", "{", "}", "[", "]", ":", ",",
              "0", "-1", "1.5", "1e999", "\\u0000", '"2024-02-29"',
              '"2024-02-29T12:00:00Z"'):
        f.write("%s\n" % json.dumps(w))
write("schema", "deep.json", "[" * 40 + "]" * 40)

# The rules' own words: keys, operators, priorities, partners.
with open(os.path.join(HERE, "rules.dict"), "w", encoding="ascii") as f:
    f.write("# Keys, operators and values of the rules format\n"
            "# (schemas/rules.md), written by make_seeds.py.\n")
    for w in ("version:", "fallback:", "rules:", "name:", "when:", "then:",
              "targets:", "partner:", "fields:", "priority:", "continue:",
              "optional:", "escalate_to:", "description:", "all:", "any:", "not:",
              "field:", "equals:", "in:", "contains:", "lt:", "le:", "gt:",
              "ge:", "present:", "normal", "high", "urgent", "true",
              "false", "veilig-thuis", "zorgcoordinator", "avim",
              "ketenregisseur", "arbeidsinspectie", "- ", "{", "}", "[",
              "]", "&a", "*a", "!!str", "---", "...", "|", ">", "#"):
        f.write("%s\n" % json.dumps(w))
write("schema", "nul-in-string.json", '{"schema_version":"referral\\u0000v1"}')
