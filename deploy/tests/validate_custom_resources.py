#!/usr/bin/env python3
"""Validates custom resources against their CustomResourceDefinitions' openAPIV3Schema.

kubernetes-validate knows only built-in kinds; this checks the others the way the API server's
strict field validation would: every document whose apiVersion belongs to one of the given
CRDs is validated against the schema of its served version, with unknown fields rejected
(except below x-kubernetes-preserve-unknown-fields), and a document of a CRD's group whose
kind or version no CRD serves is an error.

Usage: validate_custom_resources.py --crds FILE_OR_DIR [--crds ...] MANIFEST...
Prints one line per custom resource ("ok" or "FAIL" and why); exits 1 on any failure, 2 on
unusable input. Needs jsonschema and PyYAML (scripts/install-tools.sh validate-python).
"""

import argparse
import copy
import os
import sys

import jsonschema
import yaml


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def strict(schema):
    """A copy of a structural schema in which objects with declared properties reject others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return
        props = node.get("properties")
        if isinstance(props, dict):
            for child in props.values():
                walk(child)
            if "additionalProperties" not in node:
                node["additionalProperties"] = False
        if isinstance(node.get("items"), dict):
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []) or []:
                walk(child)

    walk(schema)
    # apiVersion, kind and metadata (ObjectMeta) belong to every object; the API server
    # describes them, a CRD's schema may leave them out.
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    return schema


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crds", action="append", required=True, help="CRD file or folder")
    ap.add_argument("manifests", nargs="+")
    args = ap.parse_args()

    crd_files = []
    for p in args.crds:
        if os.path.isdir(p):
            crd_files += sorted(
                os.path.join(p, f) for f in os.listdir(p) if f.endswith((".yaml", ".yml"))
            )
        else:
            crd_files.append(p)
    schemas = {}  # (group, version, kind) -> schema
    groups = set()
    for path in crd_files:
        for doc in load_docs(path):
            if doc.get("kind") != "CustomResourceDefinition":
                print(f"error: {path}: not a CustomResourceDefinition", file=sys.stderr)
                return 2
            spec = doc["spec"]
            groups.add(spec["group"])
            for v in spec["versions"]:
                if not v.get("served", False):
                    continue
                schema = v["schema"]["openAPIV3Schema"]
                jsonschema.Draft7Validator.check_schema(schema)
                schemas[(spec["group"], v["name"], spec["names"]["kind"])] = strict(schema)
    if not schemas:
        print("error: no served CRD versions found", file=sys.stderr)
        return 2

    failed = 0
    for path in args.manifests:
        for doc in load_docs(path):
            api_version = doc.get("apiVersion", "")
            group, _, version = api_version.rpartition("/")
            if group not in groups:
                continue
            kind = doc.get("kind", "")
            name = (doc.get("metadata") or {}).get("name", "<no name>")
            what = f"{kind}/{name} ({api_version})"
            schema = schemas.get((group, version, kind))
            if schema is None:
                print(f"FAIL {what}: no CRD serves {kind} in {api_version}")
                failed += 1
                continue
            errors = sorted(
                jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
            )
            if errors:
                failed += 1
                for e in errors:
                    where = ".".join(str(p) for p in e.path) or "<root>"
                    print(f"FAIL {what}: {where}: {e.message}")
            else:
                print(f"ok {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
