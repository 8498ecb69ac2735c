#!/usr/bin/env python3
"""Shows that check_deploy.py refuses what it should: each case edits a copy of the
manifests (deploy/kubernetes) one way and expects the named error; the untouched copy
and the allowed variants must pass.

    check_deploy_refusals.py --binary target/debug/multilora --deploy deploy/kubernetes

Prints `ok: N cases` or one `FAIL:` line per case that went wrong (exit status 1).
"""

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

TENANTS_ARG = "            - --tenants-file=/etc/multilora/tenants.toml\n"
DRAIN_ARG = "            - --drain-timeout-s=30\n"
TLS_ARGS = "            - --tls-cert=/etc/multilora/tls.crt\n            - --tls-key=/etc/multilora/tls.key\n"
TLS_PROBES = ("              port: 50051\n", "              port: 50051\n              mode: TLS\n")


def extra_args(text):
    return (DRAIN_ARG, DRAIN_ARG + text)


# (case, [(old, new) edits of deployment.yaml], the error expected or None for a pass)
CASES = [
    ("unchanged", [], None),
    ("no tenants file", [(TENANTS_ARG, "")], "no --tenants-file"),
    (
        "the tenants file by environment variable",
        [
            (TENANTS_ARG, ""),
            ("          env:\n", "          env:\n            - name: MULTILORA_TENANTS_FILE\n"
             "              value: /etc/multilora/tenants.toml\n"),
        ],
        None,
    ),
    ("the tenants file on no volume", [("tenants-file=/etc/multilora/", "tenants-file=/srv/")],
     "--tenants-file /srv/tenants.toml is on no mounted volume"),
    (
        "the tenants file mounted read-write",
        [("mountPath: /etc/multilora\n              readOnly: true", "mountPath: /etc/multilora")],
        "is mounted read-write",
    ),
    ("a journal on the shared adapter claim", [extra_args("            - --state-dir=/adapters/state\n")],
     "on claim 'multilora-adapters', shared by 2 replicas"),
    ("a journal in the pod's own volume", [extra_args("            - --state-dir=/cache/state\n")], None),
    ("TLS with plaintext probes", [extra_args(TLS_ARGS)], "plaintext gRPC probe"),
    ("TLS with TLS probes", [extra_args(TLS_ARGS), TLS_PROBES], None),
    (
        "mutual TLS with probes",
        [extra_args(TLS_ARGS + "            - --tls-client-ca=/etc/multilora/ca.crt\n"), TLS_PROBES],
        "the kubelet presents no client certificate",
    ),
]


def run_case(binary, deploy, edits, workdir):
    copy = pathlib.Path(workdir) / "deploy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(deploy, copy)
    manifest = copy / "deployment.yaml"
    text = manifest.read_text()
    for old, new in edits:
        if old not in text:
            return None, f"the edit's target {old!r} is not in deployment.yaml"
        text = text.replace(old, new)
    manifest.write_text(text)
    script = pathlib.Path(__file__).with_name("check_deploy.py")
    out = subprocess.run(
        [sys.executable, str(script), "--binary", binary, "--deploy", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    return out, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--deploy", required=True)
    opts = ap.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as workdir:
        for case, edits, expected in CASES:
            out, problem = run_case(opts.binary, opts.deploy, edits, workdir)
            if problem:
                failures.append(f"{case}: {problem}")
            elif expected is None and out.returncode != 0:
                failures.append(f"{case}: refused:\n{out.stderr}")
            elif expected is not None and (out.returncode == 0 or expected not in out.stderr):
                failures.append(f"{case}: expected an error with {expected!r}, got:\n{out.stdout}{out.stderr}")
    for f in failures:
        print(f"FAIL: {f}")
    if failures:
        return 1
    print(f"ok: {len(CASES)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
