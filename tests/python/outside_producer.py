#!/usr/bin/env python3
"""An outside producer of streamledger proposals, written from the README alone: no project code.

Builds each proposal, signs it the way services/core/src/crypto.rs documents (an explicit,
domain-separated, length-prefixed preimage, never the Avro bytes), encodes it with
schemas/proposals.avsc and produces it to `<channel>.proposals`, keyed by its tx id, with
confluent-kafka (its own librdkafka). Two framings:

- `single-object`: Avro single-object encoding, C3 01 + the schema's 8-byte CRC-64-AVRO
  fingerprint + the datum (fastavro's schemaless_writer);
- `confluent`: Confluent's wire format through the schema registry, 0x00 + the 4-byte schema id +
  the datum (confluent_kafka's AvroSerializer, subject `<channel>.proposals-value`);
- `raw-id:N`: a correctly signed proposal framed 0x00 + schema id N, for ids no registry has.

Usage:
  outside_producer.py --bootstrap HOST:PORT --keys keys.toml --client Org1/client0 \
      --schema schemas/proposals.avsc --channel mychannel [--registry URL] PLAN.json

PLAN.json is a list of {"contract", "function", "args", "framing"}. Prints one JSON line per
produced proposal: {"tx_id", "framing", "partition", "offset"}.
"""

import argparse
import hashlib
import io
import json
import os
import struct
import sys
import time
import tomllib

import fastavro
from confluent_kafka import Producer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastavro.schema import fingerprint, to_parsing_canonical_form


class Preimage:
    """crypto.rs's Preimage: a domain tag, then every field; bytes and strings with their length
    as a big-endian u64 in front, integers as big-endian i64."""

    def __init__(self, domain):
        self.out = bytearray()
        self.bytes(domain.encode())

    def bytes(self, b):
        self.out += struct.pack(">Q", len(b)) + b
        return self

    def str(self, s):
        return self.bytes(s.encode())

    def i64(self, v):
        self.out += struct.pack(">q", v)
        return self

    def identity(self, org, public_key):
        return self.str(org).bytes(public_key)


def tx_id(nonce, org, public_key):
    """hex(SHA-256(preimage("streamledger/txid/v1", nonce, creator)))."""
    p = Preimage("streamledger/txid/v1").bytes(nonce).identity(org, public_key)
    return hashlib.sha256(p.out).hexdigest()


def signing_bytes(p):
    """What a client signs: every proposal field but the signature."""
    pre = Preimage("streamledger/proposal/v1")
    pre.str(p["tx_id"]).str(p["channel"]).str(p["contract"]).str(p["function"]).i64(len(p["args"]))
    for a in p["args"]:
        pre.str(a)
    pre.identity(p["creator"]["org"], p["creator"]["public_key"]).bytes(p["nonce"]).i64(p["timestamp_ms"])
    return bytes(pre.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--keys", required=True, help="the network's keys.toml")
    ap.add_argument("--client", default="Org1/client0", help="the key-store entry to sign with (ORG/NAME)")
    ap.add_argument("--schema", required=True, help="schemas/proposals.avsc")
    ap.add_argument("--channel", default="mychannel")
    ap.add_argument("--registry", help="schema registry URL, for the confluent framing")
    ap.add_argument("plan")
    args = ap.parse_args()

    with open(args.keys, "rb") as f:
        seed = bytes.fromhex(tomllib.load(f)["keys"][args.client])
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public_key = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    org = args.client.split("/")[0]

    with open(args.schema) as f:
        schema_text = f.read()
    schema = fastavro.parse_schema(json.loads(schema_text))
    # The single-object header: magic C3 01, then the fingerprint's 8 bytes (fastavro's hex is in
    # the order the spec puts them on the wire, little-endian).
    header = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))

    topic = f"{args.channel}.proposals"
    serializer = None
    if args.registry:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        registry = SchemaRegistryClient({"url": args.registry})
        # TopicNameStrategy (the default): subject `<channel>.proposals-value`.
        avro = AvroSerializer(registry, schema_text, conf={"auto.register.schemas": True})
        serializer = lambda value: avro(value, SerializationContext(topic, MessageField.VALUE))

    # Idempotent with acks=all, as streamledger's own producers; murmur2 places keys where Java
    # clients (and streamledger) put them.
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
    })
    delivered = []

    def report(err, msg):
        if err is not None:
            sys.exit(f"delivery of {msg.key()!r} failed: {err}")
        delivered.append(msg)

    with open(args.plan) as f:
        plan = json.load(f)
    framings = {}
    for step in plan:
        nonce = os.urandom(24)
        p = {
            "tx_id": "",
            "channel": args.channel,
            "contract": step["contract"],
            "function": step["function"],
            "args": [str(a) for a in step["args"]],
            "creator": {"org": org, "public_key": public_key},
            "nonce": nonce,
            "timestamp_ms": int(time.time() * 1000),
            "signature": b"",
        }
        p["tx_id"] = tx_id(nonce, org, public_key)
        p["signature"] = key.sign(signing_bytes(p))
        framing = step["framing"]
        if framing == "confluent":
            if serializer is None:
                sys.exit("the confluent framing needs --registry")
            value = serializer(p)
        else:
            datum = io.BytesIO()
            fastavro.schemaless_writer(datum, schema, p)
            if framing == "single-object":
                value = header + datum.getvalue()
            elif framing.startswith("raw-id:"):
                value = b"\x00" + struct.pack(">I", int(framing[len("raw-id:"):])) + datum.getvalue()
            else:
                sys.exit(f"unknown framing {framing!r}")
        framings[p["tx_id"]] = framing
        producer.produce(topic, key=p["tx_id"].encode(), value=value, on_delivery=report)
        producer.poll(0)
    left = producer.flush(30)
    if left:
        sys.exit(f"{left} proposals not delivered within 30 s")
    for msg in delivered:
        tx = msg.key().decode()
        print(json.dumps({"tx_id": tx, "framing": framings[tx], "partition": msg.partition(), "offset": msg.offset()}))


if __name__ == "__main__":
    main()
