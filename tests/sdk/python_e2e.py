#!/usr/bin/env python3
"""End-to-end test of Keygate with the official Cryptolens Python SDK (PyPI `licensing==0.54`).

The script seeds its own tenant, products, keys and access tokens with the keygate CLI, then
talks to the running server only through the SDK (Key.activate / get_key / deactivate /
create_trial_key and Helpers.IsOnRightMachine). It checks signature verification, field
round-trips, node-locked and floating seat limits, deactivation, blocking, metadata, error
messages, token scopes and trial keys.

It is run by the Rust test harness, which has already started `keygate serve` over HTTPS and sets:
  KEYGATE_BIN, KEYGATE_DATA_DIR  the CLI used for seeding: $KEYGATE_BIN --data-dir $KEYGATE_DATA_DIR ... --json
  KEYGATE_URL                    https://127.0.0.1:PORT of the server (no trailing slash)
  SSL_CERT_FILE                  the server's self-signed certificate (TLS verification stays on)
By hand: `pip install licensing==0.54`, export the variables above, `python3 tests/sdk/python_e2e.py`.

Prints one line per check, stops at the first failure (exit status 1) and always ends with a
line like `sdk-python: 14 passed, 0 failed`.
"""

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time

from licensing.internal import HelperMethods
from licensing.methods import Helpers, Key

# Exact server messages (Cryptolens Web API v3; clients compare them literally).
LIMIT = "Cannot activate the new device as the limit has been reached."
BLOCKED = "The key is blocked and cannot be accessed."
NEVER_ACTIVATED = "Either the machine code was never activated or key activation feature was never set up."
NO_AUTH = "Unable to authenticate."
NO_PRODUCT = "Could not find the product."
NO_KEY = "Could not find the key."
DENIED = "Access denied."
# Answers that only mean "the CLI change has not reached the server yet".
NOT_YET = {NO_PRODUCT, NO_AUTH, NO_KEY}

PROPAGATION_TIMEOUT = 15.0  # seconds; the server polls the store about once a second
POLL_INTERVAL = 0.25
CLI_TIMEOUT = 60

NAME = "sdk-python"
passed = 0


# ---------------------------------------------------------------------------------------------
# reporting

def finish(failed):
    print(f"{NAME}: {passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


def fail(what, detail):
    print(f"FAIL {what}: {detail}", flush=True)
    finish(1)


def check(what, cond, detail=""):
    global passed
    if not cond:
        fail(what, detail)
    passed += 1
    print(f"ok   {what}", flush=True)


def env(name):
    value = os.environ.get(name)
    if not value:
        print(f"FAIL setup: environment variable {name} is not set", flush=True)
        finish(1)
    return value


# ---------------------------------------------------------------------------------------------
# control plane (keygate CLI)

KEYGATE_BIN = env("KEYGATE_BIN")
KEYGATE_DATA_DIR = env("KEYGATE_DATA_DIR")
KEYGATE_URL = env("KEYGATE_URL").rstrip("/")


def cli(*args):
    """Runs `keygate --data-dir DIR <args> --json` and returns the parsed JSON object."""
    cmd = [KEYGATE_BIN, "--data-dir", KEYGATE_DATA_DIR, *[str(a) for a in args], "--json"]
    shown = "keygate " + " ".join(str(a) for a in args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        fail(shown, f"no answer within {CLI_TIMEOUT}s")
    if proc.returncode != 0:
        fail(shown, f"exit status {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        fail(shown, f"stdout is not JSON: {proc.stdout!r}\nstderr: {proc.stderr}")
    if not isinstance(out, dict):
        fail(shown, f"stdout is not a JSON object: {proc.stdout!r}")
    return out


# ---------------------------------------------------------------------------------------------
# helpers

def machine_code():
    """A random machine code shaped like the SDK's (SHA-256 hex)."""
    return hashlib.sha256(secrets.token_bytes(32)).hexdigest()


def until(what, call, done, timeout=PROPAGATION_TIMEOUT):
    """Calls `call()` until `done(result)` holds; fails with the last result after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        res = call()
        if done(res):
            return res
        if time.monotonic() >= deadline:
            fail(what, f"still not as expected after {timeout:.0f}s; last result: {res!r}")
        time.sleep(POLL_INTERVAL)


def propagated(res):
    """True once the answer is no longer one of the 'not seeded yet' errors."""
    return not (res[0] is None and res[1] in NOT_YET)


def raw(lic):
    """The signed JSON object exactly as the server sent it (inside the base64 `licenseKey`)."""
    return json.loads(base64.b64decode(lic.raw_response.license_key).decode("utf-8"))


def mids(lic):
    return sorted(m.Mid for m in (lic.activated_machines or []))


def machine(lic, mid):
    for m in lic.activated_machines or []:
        if m.Mid == mid:
            return m
    return None


def near(value, target, slack):
    return isinstance(value, int) and abs(value - target) <= slack


def is_failure(res, message):
    return res[0] is None and res[1] == message


# ---------------------------------------------------------------------------------------------
# main

def main():
    HelperMethods.server_address = KEYGATE_URL + "/api/"
    HelperMethods.verify_SSL = True  # the certificate comes from SSL_CERT_FILE

    # --- seed ------------------------------------------------------------------------------
    tag = secrets.token_hex(4)
    tenant = cli("tenant", "create", "--name", f"sdk-python-{tag}")
    tenant_id, pubkey = tenant["tenant_id"], tenant["public_key"]
    pid = cli("product", "create", "--tenant", tenant_id, "--name", "python-e2e")["product_id"]
    pid2 = cli("product", "create", "--tenant", tenant_id, "--name", "python-e2e-other")["product_id"]

    notes = "python e2e notes \u2013 \u00fcn\u00efc\u00f6de"
    cust = {"Name": "Ada Lovelace", "Email": f"ada-{tag}@example.com", "CompanyName": "Analytical Engines Ltd"}
    do_name, do_str, do_int = "edition", "professional", 42
    k_main = cli("key", "create", "--product", pid, "--period", 30, "--max-machines", 2,
                 "--notes", notes, "--f1",
                 "--customer-name", cust["Name"], "--customer-email", cust["Email"],
                 "--customer-company", cust["CompanyName"],
                 "--data-object", f"{do_name}={do_str}:{do_int}")
    k_block = cli("key", "create", "--product", pid, "--max-machines", 1)
    k_born_blocked = cli("key", "create", "--product", pid, "--max-machines", 1, "--block")
    k_float = cli("key", "create", "--product", pid, "--max-machines", 1)
    mc_allowed = machine_code()
    k_allowed = cli("key", "create", "--product", pid, "--max-machines", 1, "--allowed-machines", mc_allowed)
    k_trialact = cli("key", "create", "--product", pid, "--period", 7, "--max-machines", 1, "--trial-activation")
    k_other = cli("key", "create", "--product", pid2, "--max-machines", 1)

    all_methods = "Activate,GetKey,Deactivate,CreateTrialKey"
    tok = cli("token", "create", "--tenant", tenant_id, "--methods", all_methods)["token"]
    tok_getkey = cli("token", "create", "--tenant", tenant_id, "--methods", "GetKey")["token"]
    tok_pid2 = cli("token", "create", "--tenant", tenant_id, "--methods", all_methods, "--product", pid2)["token"]
    print(f"seeded tenant {tenant_id}, products {pid}/{pid2}, key {k_main['key']}", flush=True)

    key = k_main["key"]
    mc1, mc2, mc3 = machine_code(), machine_code(), machine_code()

    def activate(k, mc, token=None, product=None, **kw):
        return Key.activate(token or tok, pubkey, product or pid, k, mc, **kw)

    def get_key(k, token=None, product=None):
        return Key.get_key(token or tok, pubkey, product or pid, k)

    # --- 1. activation with signature check and field round-trip -----------------------------
    before = int(time.time())
    res = until("activate (waiting for seeded data)",
                lambda: activate(key, mc1, friendly_name="e2e-host-1"), propagated)
    check("activate: success, signature verified by the SDK", res[0] is not None, f"result {res!r}")
    lic = res[0]
    r = raw(lic)
    now = int(time.time())
    check("activate: ProductId, ID, GlobalId and Key round-trip",
          (lic.product_id, lic.id, lic.global_id, lic.key) == (pid, k_main["id"], k_main["global_id"], key),
          f"got {(lic.product_id, lic.id, lic.global_id, lic.key)!r}, "
          f"want {(pid, k_main['id'], k_main['global_id'], key)!r}")
    flags = [lic.f1, lic.f2, lic.f3, lic.f4, lic.f5, lic.f6, lic.f7, lic.f8]
    check("activate: F1 true, F2..F8 false", flags == [True] + [False] * 7, f"got {flags!r}")
    check("activate: Notes round-trip (UTF-8)", lic.notes == notes, f"got {lic.notes!r}")
    check("activate: Period 30, MaxNoOfMachines 2, Block false, TrialActivation false",
          (lic.period, lic.max_no_of_machines, lic.block, lic.trial_activation) == (30, 2, False, False),
          f"got {(lic.period, lic.max_no_of_machines, lic.block, lic.trial_activation)!r}")
    check("activate: Expires in the future, SignDate is now",
          r["Expires"] > now and near(r["SignDate"], now, 300),
          f"Expires {r['Expires']}, SignDate {r['SignDate']}, now {now}")
    c = lic.customer or {}
    check("activate: Customer name/email/company round-trip",
          isinstance(lic.customer, dict)
          and {k: c.get(k) for k in cust} == cust
          and isinstance(c.get("Id"), int) and isinstance(c.get("Created"), int),
          f"got {lic.customer!r}")
    dos = lic.data_objects or []
    check("activate: DataObjects round-trip",
          len(dos) == 1 and dos[0].get("Name") == do_name and dos[0].get("StringValue") == do_str
          and dos[0].get("IntValue") == do_int and isinstance(dos[0].get("Id"), int),
          f"got {lic.data_objects!r}")
    check("activate: AllowedMachines empty", lic.allowed_machines == "", f"got {lic.allowed_machines!r}")
    m1 = machine(lic, mc1)
    check("activate: ActivatedMachines == [machine 1] with FriendlyName and Time",
          mids(lic) == [mc1] and m1.FriendlyName == "e2e-host-1"
          and isinstance(m1.Time, int) and before - 300 <= m1.Time <= now + 300,
          f"got {r.get('ActivatedMachines')!r}")
    check("activate: Helpers.IsOnRightMachine true for machine 1, false for machine 2",
          Helpers.IsOnRightMachine(lic, custom_machine_code=mc1)
          and not Helpers.IsOnRightMachine(lic, custom_machine_code=mc2),
          f"ActivatedMachines {mids(lic)!r}")
    first_time = m1.Time

    # --- 2. re-activation of the same machine ---------------------------------------------------
    time.sleep(1.2)  # so that a rewritten Time would differ
    res = activate(key, mc1, friendly_name="e2e-host-1")
    check("re-activate machine 1: success, still 1 machine, Time unchanged",
          res[0] is not None and mids(res[0]) == [mc1] and machine(res[0], mc1).Time == first_time,
          f"result {res!r}" if res[0] is None else f"machines {raw(res[0])['ActivatedMachines']!r}, "
                                                   f"first Time {first_time}")

    # --- 3. machine limit ---------------------------------------------------------------------
    res = activate(key, mc2)
    check("activate machine 2: success, 2 machines",
          res[0] is not None and mids(res[0]) == sorted([mc1, mc2]),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")
    res = activate(key, mc3)
    check("activate machine 3: refused with the limit message", is_failure(res, LIMIT), f"result {res!r}")

    # --- 4. deactivation ------------------------------------------------------------------------
    res = Key.deactivate(tok, pid, key, mc2)
    check("deactivate machine 2: (True, '')", res == (True, ""), f"result {res!r}")
    res = activate(key, mc3)
    check("activate machine 3 after deactivation: success, machines 1 and 3",
          res[0] is not None and mids(res[0]) == sorted([mc1, mc3]),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")
    res = Key.deactivate(tok, pid, key, machine_code())
    check("deactivate unknown machine: (False, never-activated message)",
          res == (False, NEVER_ACTIVATED), f"result {res!r}")

    # --- 5. GetKey ------------------------------------------------------------------------------
    res = get_key(key)
    check("get_key: success, signature verified, same key, machines unchanged (1 and 3)",
          res[0] is not None and res[0].key == key and mids(res[0]) == sorted([mc1, mc3]),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")
    res = activate(key, mc1)
    check("get_key did not add a machine",
          res[0] is not None and mids(res[0]) == sorted([mc1, mc3]),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")

    # --- 8. metadata ------------------------------------------------------------------------------
    res = activate(key, mc1, metadata=True)
    check("activate with metadata=True: 3-tuple whose metadata is a verified dict (SHA-512)",
          len(res) == 3 and res[0] is not None and isinstance(res[2], dict),
          f"result {res!r}")
    print(f"     metadata: {json.dumps(res[2], sort_keys=True)}", flush=True)

    # --- 6. blocking ------------------------------------------------------------------------------
    kb, mcb = k_block["key"], machine_code()
    res = until("activate blocking-test key (waiting for seeded data)", lambda: activate(kb, mcb), propagated)
    check("blocking-test key: activates before blocking", res[0] is not None, f"result {res!r}")
    out = cli("key", "block", "--product", pid, "--key", kb)
    check("CLI key block: blocked true", out.get("blocked") is True and out.get("key") == kb, f"got {out!r}")
    res = until("activate a blocked key", lambda: activate(kb, mcb), lambda r: is_failure(r, BLOCKED))
    check("activate blocked key: refused with the blocked message", is_failure(res, BLOCKED), f"result {res!r}")
    res = get_key(kb)
    check("get_key on blocked key: success with Block true",
          res[0] is not None and res[0].block is True, f"result {res!r}")
    res = Key.deactivate(tok, pid, kb, mcb)
    check("deactivate on blocked key: (False, blocked message)", res == (False, BLOCKED), f"result {res!r}")
    out = cli("key", "unblock", "--product", pid, "--key", kb)
    check("CLI key unblock: blocked false", out.get("blocked") is False, f"got {out!r}")
    res = until("activate after unblock", lambda: activate(kb, mcb), lambda r: r[0] is not None)
    check("activate after unblock: success, Block false, machine kept",
          res[0].block is False and mids(res[0]) == [mcb], f"machines {mids(res[0])!r}")
    res = until("activate key created with --block (waiting for seeded data)",
                lambda: activate(k_born_blocked["key"], machine_code()), propagated)
    check("key created with --block: activate refused with the blocked message",
          is_failure(res, BLOCKED), f"result {res!r}")

    # --- 7. floating licenses -------------------------------------------------------------------
    kf = k_float["key"]
    fa, fb, fc, fd = machine_code(), machine_code(), machine_code(), machine_code()

    def floating(mc, overdraft=0):
        return activate(kf, mc, floating_time_interval=100, max_overdraft=overdraft)

    res = until("floating activate (waiting for seeded data)", lambda: floating(fa), propagated)
    check("floating activate machine A: success", res[0] is not None, f"result {res!r}")
    lic = res[0]
    ma = machine(lic, "floating:" + fa)
    now = int(time.time())
    check("floating: Mid is 'floating:'+machine code, FloatingExpires about now+100",
          ma is not None and near(ma.FloatingExpires, now + 100, 60),
          f"machines {raw(lic)['ActivatedMachines']!r}, now {now}")
    check("floating: IsOnRightMachine(is_floating_license=True) true for A, false for B",
          Helpers.IsOnRightMachine(lic, is_floating_license=True, custom_machine_code=fa)
          and not Helpers.IsOnRightMachine(lic, is_floating_license=True, custom_machine_code=fb),
          f"machines {mids(lic)!r}")
    res = floating(fa)
    check("floating re-activate machine A: success (lease refreshed)", res[0] is not None, f"result {res!r}")
    res = floating(fb)
    check("floating activate machine B: refused with the limit message", is_failure(res, LIMIT), f"result {res!r}")
    res = Key.deactivate(tok, pid, kf, fa, floating=True)
    check("deactivate floating machine A: (True, '')", res == (True, ""), f"result {res!r}")
    res = floating(fb)
    check("floating activate machine B after release: success",
          res[0] is not None
          and Helpers.IsOnRightMachine(res[0], is_floating_license=True, custom_machine_code=fb),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")
    res = floating(fc, overdraft=1)
    check("floating machine C with max_overdraft=1: success, IsOnRightMachine(allow_overdraft=True)",
          res[0] is not None
          and Helpers.IsOnRightMachine(res[0], is_floating_license=True, allow_overdraft=True,
                                       custom_machine_code=fc),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")
    res = floating(fd, overdraft=1)
    check("floating machine D with max_overdraft=1: refused with the limit message",
          is_failure(res, LIMIT), f"result {res!r}")
    res = Key.deactivate(tok, pid, kf, machine_code(), floating=True)
    check("deactivate floating for an unknown machine: (True, '')", res == (True, ""), f"result {res!r}")

    # --- AllowedMachines and trial activation ----------------------------------------------------
    ka = k_allowed["key"]
    res = until("activate allowed-machines key (waiting for seeded data)",
                lambda: activate(ka, machine_code()), propagated)
    check("allowed-machines key: first machine activates, AllowedMachines lists the machine",
          res[0] is not None and mc_allowed in (res[0].allowed_machines or "").splitlines(),
          f"result {res!r}" if res[0] is None else f"AllowedMachines {res[0].allowed_machines!r}")
    res = activate(ka, machine_code())
    check("allowed-machines key: other machine refused at the limit", is_failure(res, LIMIT), f"result {res!r}")
    res = activate(ka, mc_allowed)
    check("allowed-machines key: listed machine activates above the limit",
          res[0] is not None and mc_allowed in mids(res[0]) and len(mids(res[0])) == 2,
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}")

    res = until("activate trial-activation key (waiting for seeded data)",
                lambda: activate(k_trialact["key"], machine_code()), propagated)
    now = int(time.time())
    check("trial-activation key: activation sets Expires to about now + Period (7 days)",
          res[0] is not None and res[0].trial_activation is True
          and near(raw(res[0])["Expires"], now + 7 * 86400, 86400 + 300),
          f"result {res!r}" if res[0] is None else f"Expires {raw(res[0])['Expires']}, now {now}")

    # --- 9. error messages ------------------------------------------------------------------------
    bogus_token = base64.b64encode(json.dumps([str(10 ** 9), secrets.token_urlsafe(24)]).encode()).decode()
    res = activate(key, mc1, token=bogus_token)
    check("unknown token: 'Unable to authenticate.'", is_failure(res, NO_AUTH), f"result {res!r}")
    res = activate(key, mc1, product=2_000_000_000 + secrets.randbelow(10 ** 6))
    check("unknown product: 'Could not find the product.'", is_failure(res, NO_PRODUCT), f"result {res!r}")
    res = activate("ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ", mc1)
    check("unknown key: 'Could not find the key.'", is_failure(res, NO_KEY), f"result {res!r}")
    res = activate(k_other["key"], mc1)
    check("key of another product: 'Could not find the key.'", is_failure(res, NO_KEY), f"result {res!r}")
    res = get_key("ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ")
    check("get_key unknown key: 'Could not find the key.'", is_failure(res, NO_KEY), f"result {res!r}")

    # --- 10. token scopes -------------------------------------------------------------------------
    res = until("activate with a GetKey-only token (waiting for seeded data)",
                lambda: activate(key, mc1, token=tok_getkey), propagated)
    check("GetKey-only token: activate gets 'Access denied.'", is_failure(res, DENIED), f"result {res!r}")
    res = get_key(key, token=tok_getkey)
    check("GetKey-only token: get_key succeeds", res[0] is not None, f"result {res!r}")
    res = until("activate with a product-locked token (waiting for seeded data)",
                lambda: activate(k_other["key"], machine_code(), token=tok_pid2, product=pid2), propagated)
    check("token locked to product 2: activates a key of product 2", res[0] is not None, f"result {res!r}")
    res = activate(key, mc1, token=tok_pid2)
    check("token locked to product 2: 'Access denied.' on product 1", is_failure(res, DENIED), f"result {res!r}")

    # --- 11. CreateTrialKey -----------------------------------------------------------------------
    mct = machine_code()
    res = until("create_trial_key (waiting for seeded data)",
                lambda: Key.create_trial_key(tok, pid, mct), propagated)
    trial_key = res[0]
    check("create_trial_key: returns a key string",
          isinstance(trial_key, str) and trial_key != "" and res[1] == "", f"result {res!r}")
    res = Key.create_trial_key(tok, pid, mct)
    check("create_trial_key again, same machine: same key", res == (trial_key, ""), f"result {res!r}")
    res = Key.create_trial_key(tok, pid, machine_code())
    check("create_trial_key, other machine: a different key",
          res[0] is not None and res[0] != trial_key, f"result {res!r}")
    res = until("activate the trial key", lambda: activate(trial_key, mct), propagated)
    check("activate trial key on its machine: success, IsOnRightMachine, not expired",
          res[0] is not None and Helpers.IsOnRightMachine(res[0], custom_machine_code=mct)
          and raw(res[0])["Expires"] > int(time.time()),
          f"result {res!r}" if res[0] is None else f"machines {mids(res[0])!r}, Expires {raw(res[0])['Expires']}")

    finish(0)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:  # an unexpected crash still counts as a failed check
        import traceback
        traceback.print_exc()
        fail("unexpected exception", "see traceback above")
