#!/usr/bin/env python3
"""A stand-in for ``gcloud`` (and ``xpk``) on PATH: records every call and answers from a script.

Installed as a two-line wrapper ``exec python fake_gcloud.py NAME "$@"`` (NAME: gcloud or xpk).

FAKE_GCLOUD_LOG: a file; each call appends its argv as one JSON list.
FAKE_GCLOUD_RULES: a JSON file ``[{"match": "...", "out": "...", "err": "...", "rc": 0, "times": 1}, ...]``. A call
takes the first rule whose ``match`` is a substring of its space-joined argv and that has ``times`` left (no
``times``: forever), prints ``out``/``err`` and exits ``rc``; one-shot rules are used up (the file is rewritten).
No matching rule: no output, rc 0.
"""

import json
import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    path = os.environ.get("FAKE_GCLOUD_RULES")
    rules = json.load(open(path)) if path and os.path.exists(path) else []
    line = " ".join(argv)
    for rule in rules:
        if rule["match"] in line and rule.get("times", 1) > 0:
            if "times" in rule:
                rule["times"] -= 1
                with open(path, "w") as f:
                    json.dump(rules, f)
            sys.stdout.write(rule.get("out", ""))
            sys.stderr.write(rule.get("err", ""))
            return int(rule.get("rc", 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
