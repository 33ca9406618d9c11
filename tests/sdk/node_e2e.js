#!/usr/bin/env node
// End-to-end test of Keygate with the official Cryptolens Node.js SDK (npm `cryptolens@1.0.11`).
//
// The script seeds its own tenant, products, keys and access tokens with the keygate CLI, then
// talks to the running server only through the SDK (Key.Activate / GetKey / Deactivate /
// CreateTrialKey, Helpers.IsOnRightMachineCustom). It checks signature verification (by the SDK
// and independently with node:crypto), field round-trips, node-locked and floating seat limits,
// deactivation, blocking, error messages, token scopes and trial keys.
//
// It is run by the Rust test harness, which has already started `keygate serve` over HTTPS and sets:
//   KEYGATE_BIN, KEYGATE_DATA_DIR  the CLI used for seeding: $KEYGATE_BIN --data-dir $KEYGATE_DATA_DIR ... --json
//   KEYGATE_URL                    https://127.0.0.1:PORT of the server (no trailing slash)
//   NODE_EXTRA_CA_CERTS            the server's self-signed certificate (TLS verification stays on)
// By hand: `cd tests/sdk && npm install`, export the variables above, `node node_e2e.js`.
//
// Prints one line per check, stops at the first failure (exit status 1) and always ends with a
// line like `sdk-node: 14 passed, 0 failed`.

'use strict';

const { spawnSync } = require('child_process');
const crypto = require('crypto');
const { Key, Helpers } = require('cryptolens');

// Exact server messages (Cryptolens Web API v3; clients compare them literally).
const LIMIT = 'Cannot activate the new device as the limit has been reached.';
const BLOCKED = 'The key is blocked and cannot be accessed.';
const NEVER_ACTIVATED = 'Either the machine code was never activated or key activation feature was never set up.';
const NO_AUTH = 'Unable to authenticate.';
const NO_PRODUCT = 'Could not find the product.';
const NO_KEY = 'Could not find the key.';
const DENIED = 'Access denied.';
// Answers that only mean "the CLI change has not reached the server yet".
const NOT_YET = new Set([NO_PRODUCT, NO_AUTH, NO_KEY]);

const PROPAGATION_TIMEOUT_MS = 15000; // the server polls the store about once a second
const POLL_INTERVAL_MS = 250;
const CLI_TIMEOUT_MS = 60000;

const NAME = 'sdk-node';
let passed = 0;

// ---------------------------------------------------------------------------------------------
// reporting

class Failure extends Error {}

function finish(failed) {
  console.log(`${NAME}: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

function fail(what, detail) {
  throw new Failure(`FAIL ${what}: ${detail}`);
}

function check(what, cond, detail = '') {
  if (!cond) fail(what, typeof detail === 'function' ? detail() : detail);
  passed += 1;
  console.log(`ok   ${what}`);
}

function env(name) {
  const value = process.env[name];
  if (!value) fail('setup', `environment variable ${name} is not set`);
  return value;
}

const show = (v) => JSON.stringify(v, (k, x) => (k === 'RawResponse' ? undefined : x));

// ---------------------------------------------------------------------------------------------
// control plane (keygate CLI)

let KEYGATE_BIN, KEYGATE_DATA_DIR, URL;

function cli(...args) {
  const argv = ['--data-dir', KEYGATE_DATA_DIR, ...args.map(String), '--json'];
  const shown = `keygate ${args.join(' ')}`;
  const p = spawnSync(KEYGATE_BIN, argv, { encoding: 'utf8', timeout: CLI_TIMEOUT_MS });
  if (p.error) fail(shown, `could not run: ${p.error.message}`);
  if (p.status !== 0) fail(shown, `exit status ${p.status}\nstdout: ${p.stdout}\nstderr: ${p.stderr}`);
  let out;
  try {
    out = JSON.parse(p.stdout);
  } catch (e) {
    fail(shown, `stdout is not JSON: ${JSON.stringify(p.stdout)}\nstderr: ${p.stderr}`);
  }
  if (out === null || typeof out !== 'object' || Array.isArray(out)) fail(shown, `stdout is not a JSON object: ${p.stdout}`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A random machine code shaped like the SDK's (SHA-256 hex). */
const machineCode = () => crypto.createHash('sha256').update(crypto.randomBytes(32)).digest('hex');

/** Runs an SDK call and returns {lic, err}: the resolved value or the rejection message. */
async function attempt(promiseFn) {
  try {
    return { lic: await promiseFn(), err: null };
  } catch (e) {
    return { lic: null, err: e && e.message !== undefined ? e.message : String(e), error: e };
  }
}

/** Calls `fn()` until `done(result)` holds; fails with the last result after the timeout. */
async function until(what, fn, done, timeoutMs = PROPAGATION_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await fn();
    if (done(res)) return res;
    if (Date.now() >= deadline) fail(what, `still not as expected after ${timeoutMs / 1000}s; last result: ${show(res)}`);
    await sleep(POLL_INTERVAL_MS);
  }
}

/** True once the answer is no longer one of the 'not seeded yet' errors. */
const propagated = (res) => !(res.err !== null && NOT_YET.has(res.err));
const failedWith = (res, message) => res.lic === null && res.err === message;

const mids = (lic) => (lic.ActivatedMachines || []).map((m) => m.Mid).sort();
const machine = (lic, mid) => (lic.ActivatedMachines || []).find((m) => m.Mid === mid);
const near = (value, target, slack) => Number.isInteger(value) && Math.abs(value - target) <= slack;
const nowSecs = () => Math.floor(Date.now() / 1000);
const sameSet = (a, b) => show([...a].sort()) === show([...b].sort());

/** The SDK prints debugging output from some helpers; keep the report readable. */
async function quietly(fn) {
  const { log, warn } = console;
  console.log = () => {};
  console.warn = () => {};
  try {
    return await fn();
  } finally {
    console.log = log;
    console.warn = warn;
  }
}

/** node:crypto public key from the .NET XML <RSAKeyValue> (modulus/exponent as a JWK). */
function publicKeyFromXml(xml) {
  const field = (tag) => {
    const m = new RegExp(`<${tag}>([^<]+)</${tag}>`).exec(xml);
    if (!m) fail('public key', `no <${tag}> in ${xml}`);
    return Buffer.from(m[1], 'base64').toString('base64url');
  };
  return crypto.createPublicKey({ key: { kty: 'RSA', n: field('Modulus'), e: field('Exponent') }, format: 'jwk' });
}

function independentlyVerified(rawResponse, pub) {
  return crypto.verify(
    'sha256',
    Buffer.from(rawResponse.licenseKey, 'base64'),
    { key: pub, padding: crypto.constants.RSA_PKCS1_PADDING },
    Buffer.from(rawResponse.signature, 'base64'),
  );
}

// ---------------------------------------------------------------------------------------------
// main

async function main() {
  KEYGATE_BIN = env('KEYGATE_BIN');
  KEYGATE_DATA_DIR = env('KEYGATE_DATA_DIR');
  URL = env('KEYGATE_URL').replace(/\/+$/, ''); // the SDK appends "/api/key/..." itself

  // --- seed --------------------------------------------------------------------------------
  const tag = crypto.randomBytes(4).toString('hex');
  const tenant = cli('tenant', 'create', '--name', `sdk-node-${tag}`);
  const pubkeyXml = tenant.public_key;
  const pid = cli('product', 'create', '--tenant', tenant.tenant_id, '--name', 'node-e2e').product_id;
  const pid2 = cli('product', 'create', '--tenant', tenant.tenant_id, '--name', 'node-e2e-other').product_id;

  const notes = 'node e2e notes \u2013 \u00fcn\u00efc\u00f6de';
  const cust = { Name: 'Grace Hopper', Email: `grace-${tag}@example.com`, CompanyName: 'Compilers Inc' };
  const [doName, doStr, doInt] = ['seats', 'team', 7];
  const kMain = cli('key', 'create', '--product', pid, '--period', 30, '--max-machines', 2, '--notes', notes, '--f1',
    '--customer-name', cust.Name, '--customer-email', cust.Email, '--customer-company', cust.CompanyName,
    '--data-object', `${doName}=${doStr}:${doInt}`);
  const kBlock = cli('key', 'create', '--product', pid, '--max-machines', 1);
  const kFloat = cli('key', 'create', '--product', pid, '--max-machines', 1);
  const kOther = cli('key', 'create', '--product', pid2, '--max-machines', 1);
  const allMethods = 'Activate,GetKey,Deactivate,CreateTrialKey';
  const tok = cli('token', 'create', '--tenant', tenant.tenant_id, '--methods', allMethods).token;
  const tokGetKey = cli('token', 'create', '--tenant', tenant.tenant_id, '--methods', 'GetKey').token;
  console.log(`seeded tenant ${tenant.tenant_id}, products ${pid}/${pid2}, key ${kMain.key}`);

  const key = kMain.key;
  const [mc1, mc2, mc3] = [machineCode(), machineCode(), machineCode()];

  // Positional SDK signatures (npm 1.0.11):
  //   Activate(token, rsaPubKey, ProductId, Key, MachineCode, FieldsToReturn, Metadata, FloatingTimeInterval, MaxOverdraft, LicenseServerUrl)
  //   GetKey(token, rsaPubKey, ProductId, Key, FieldsToReturn, Metadata, LicenseServerUrl)
  //   Deactivate(token, ProductId, Key, MachineCode, Floating, OSInfo, LicenseServerUrl)
  //   CreateTrialKey(token, ProductId, MachineCode, LicenseServerUrl)
  const activate = (k, mc, { token = tok, product = pid, floating = 0, overdraft = 0 } = {}) =>
    attempt(() => Key.Activate(token, pubkeyXml, product, k, mc, 0, false, floating, overdraft, URL));
  const getKey = (k, { token = tok, product = pid } = {}) =>
    attempt(() => Key.GetKey(token, pubkeyXml, product, k, 0, false, URL));
  const deactivate = (k, mc, floating = false) =>
    attempt(() => Key.Deactivate(tok, pid, k, mc, floating, null, URL));
  const onMachine = (lic, mc, floating = false, overdraft = false) =>
    Helpers.IsOnRightMachineCustom(lic, mc, floating, overdraft);

  // --- 12. the tenant public key --------------------------------------------------------------
  const pub = publicKeyFromXml(pubkeyXml);
  check('tenant public key: 2048-bit RSA, exponent 65537',
    pub.asymmetricKeyDetails.modulusLength === 2048 && pub.asymmetricKeyDetails.publicExponent === 65537n,
    () => show({ bits: pub.asymmetricKeyDetails.modulusLength, e: String(pub.asymmetricKeyDetails.publicExponent) }));

  // --- 1. activation with signature check and field round-trip -----------------------------
  const before = nowSecs();
  let res = await until('Activate (waiting for seeded data)', () => activate(key, mc1), propagated);
  check('Activate: success, signature verified by the SDK', res.lic !== null, () => `rejected: ${res.err}`);
  let lic = res.lic;
  const now = nowSecs();
  check('Activate: signature verified independently with node:crypto (RSA PKCS#1 v1.5, SHA-256)',
    independentlyVerified(lic.RawResponse, pub), () => show(lic.RawResponse));
  const tampered = Buffer.from(lic.RawResponse.licenseKey, 'base64');
  tampered[tampered.length - 2] ^= 1;
  check('Activate: node:crypto rejects a tampered licenseKey',
    !independentlyVerified({ licenseKey: tampered.toString('base64'), signature: lic.RawResponse.signature }, pub));
  check('Activate: ProductId, ID, GlobalId and Key round-trip',
    lic.ProductId === pid && lic.ID === kMain.id && lic.GlobalId === kMain.global_id && lic.Key === key,
    () => `got ${show([lic.ProductId, lic.ID, lic.GlobalId, lic.Key])}, want ${show([pid, kMain.id, kMain.global_id, key])}`);
  const flags = [lic.F1, lic.F2, lic.F3, lic.F4, lic.F5, lic.F6, lic.F7, lic.F8];
  check('Activate: F1 true, F2..F8 false', show(flags) === show([true, false, false, false, false, false, false, false]),
    () => `got ${show(flags)}`);
  check('Activate: Notes round-trip (UTF-8)', lic.Notes === notes, () => `got ${show(lic.Notes)}`);
  check('Activate: Period 30, MaxNoOfMachines 2, Block false, TrialActivation false',
    lic.Period === 30 && lic.MaxNoOfMachines === 2 && lic.Block === false && lic.TrialActivation === false,
    () => `got ${show([lic.Period, lic.MaxNoOfMachines, lic.Block, lic.TrialActivation])}`);
  check('Activate: Expires in the future, SignDate is now',
    lic.Expires > now && near(lic.SignDate, now, 300), () => `Expires ${lic.Expires}, SignDate ${lic.SignDate}, now ${now}`);
  const c = lic.Customer || {};
  check('Activate: Customer name/email/company round-trip',
    c.Name === cust.Name && c.Email === cust.Email && c.CompanyName === cust.CompanyName
      && Number.isInteger(c.Id) && Number.isInteger(c.Created),
    () => `got ${show(lic.Customer)}`);
  const dos = lic.DataObjects || [];
  check('Activate: DataObjects round-trip',
    dos.length === 1 && dos[0].Name === doName && dos[0].StringValue === doStr && dos[0].IntValue === doInt
      && Number.isInteger(dos[0].Id),
    () => `got ${show(lic.DataObjects)}`);
  const m1 = machine(lic, mc1);
  check('Activate: ActivatedMachines == [machine 1] with Time of activation',
    show(mids(lic)) === show([mc1]) && Number.isInteger(m1.Time) && m1.Time >= before - 300 && m1.Time <= now + 300,
    () => `got ${show(lic.ActivatedMachines)}`);
  check('Activate: Helpers.IsOnRightMachineCustom true for machine 1, false for machine 2',
    await quietly(() => onMachine(lic, mc1) && !onMachine(lic, mc2)), () => `machines ${show(mids(lic))}`);
  const firstTime = m1.Time;

  // --- 2. re-activation of the same machine ---------------------------------------------------
  await sleep(1200); // so that a rewritten Time would differ
  res = await activate(key, mc1);
  check('re-activate machine 1: success, still 1 machine, Time unchanged',
    res.lic !== null && show(mids(res.lic)) === show([mc1]) && machine(res.lic, mc1).Time === firstTime,
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(res.lic.ActivatedMachines)}, first Time ${firstTime}`));

  // --- 3. machine limit ---------------------------------------------------------------------
  res = await activate(key, mc2);
  check('activate machine 2: success, 2 machines', res.lic !== null && sameSet(mids(res.lic), [mc1, mc2]),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}`));
  res = await activate(key, mc3);
  check('activate machine 3: rejected with the limit message', failedWith(res, LIMIT), () => show(res));

  // --- 4. deactivation ------------------------------------------------------------------------
  res = await deactivate(key, mc2);
  check("Deactivate machine 2: resolves with message ''", res.err === null && res.lic === '', () => show(res));
  res = await activate(key, mc3);
  check('activate machine 3 after deactivation: success, machines 1 and 3',
    res.lic !== null && sameSet(mids(res.lic), [mc1, mc3]),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}`));
  res = await deactivate(key, machineCode());
  check('Deactivate unknown machine: rejected with the never-activated message', failedWith(res, NEVER_ACTIVATED),
    () => show(res));

  // --- 5. GetKey ------------------------------------------------------------------------------
  res = await getKey(key);
  check('GetKey: success, signature verified by the SDK, machines unchanged (1 and 3)',
    res.lic !== null && res.lic.Key === key && sameSet(mids(res.lic), [mc1, mc3]),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}`));
  check('GetKey: signature verified independently with node:crypto', independentlyVerified(res.lic.RawResponse, pub),
    () => show(res.lic.RawResponse));
  res = await activate(key, mc1);
  check('GetKey did not add a machine', res.lic !== null && sameSet(mids(res.lic), [mc1, mc3]),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}`));
  // npm 1.0.11 GetKey only surfaces the server's message for a non-2xx status (on HTTP 200 it
  // tests `result === "1"` and then crashes on the missing licenseKey).
  res = await getKey('ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ');
  check("GetKey unknown key: rejected with 'Could not find the key.'", failedWith(res, NO_KEY), () => show(res));

  // --- 6. blocking ------------------------------------------------------------------------------
  const kb = kBlock.key;
  const mcb = machineCode();
  res = await until('activate blocking-test key (waiting for seeded data)', () => activate(kb, mcb), propagated);
  check('blocking-test key: activates before blocking', res.lic !== null, () => `rejected: ${res.err}`);
  let out = cli('key', 'block', '--product', pid, '--key', kb);
  check('CLI key block: blocked true', out.blocked === true && out.key === kb, () => show(out));
  res = await until('Activate a blocked key', () => activate(kb, mcb), (r) => failedWith(r, BLOCKED));
  check('Activate blocked key: rejected with the blocked message', failedWith(res, BLOCKED), () => show(res));
  res = await getKey(kb);
  check('GetKey on blocked key: success with Block true', res.lic !== null && res.lic.Block === true, () => show(res));
  out = cli('key', 'unblock', '--product', pid, '--key', kb);
  check('CLI key unblock: blocked false', out.blocked === false, () => show(out));
  res = await until('Activate after unblock', () => activate(kb, mcb), (r) => r.lic !== null);
  check('Activate after unblock: success, Block false', res.lic.Block === false, () => show(res.lic));

  // --- 7. floating licenses -------------------------------------------------------------------
  const kf = kFloat.key;
  const [fa, fb, fc] = [machineCode(), machineCode(), machineCode()];
  const floating = (mc, overdraft = 0) => activate(kf, mc, { floating: 100, overdraft });
  res = await until('floating Activate (waiting for seeded data)', () => floating(fa), propagated);
  check('floating activate machine A: success', res.lic !== null, () => `rejected: ${res.err}`);
  check("floating: Mid is 'floating:'+machine code; IsOnRightMachineCustom(floating) true for A, false for B",
    machine(res.lic, `floating:${fa}`) !== undefined
      && (await quietly(() => onMachine(res.lic, fa, true) && !onMachine(res.lic, fb, true))),
    () => `machines ${show(res.lic.ActivatedMachines)}`);
  res = await floating(fb);
  check('floating activate machine B: rejected with the limit message', failedWith(res, LIMIT), () => show(res));
  res = await deactivate(kf, fa, true);
  check("Deactivate(Floating=true) machine A: resolves with message ''", res.err === null && res.lic === '', () => show(res));
  res = await floating(fb);
  check('floating activate machine B after release: success',
    res.lic !== null && (await quietly(() => onMachine(res.lic, fb, true))),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}`));
  res = await floating(fc, 1);
  check('floating machine C with MaxOverdraft=1: success, IsOnRightMachineCustom(floating, overdraft)',
    res.lic !== null && (await quietly(() => onMachine(res.lic, fc, true, true))),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}`));

  // --- 9. error messages ------------------------------------------------------------------------
  const bogusToken = Buffer.from(JSON.stringify(['1000000000', crypto.randomBytes(18).toString('base64url')])).toString('base64');
  res = await activate(key, mc1, { token: bogusToken });
  check("unknown token: 'Unable to authenticate.'", failedWith(res, NO_AUTH), () => show(res));
  res = await activate(key, mc1, { product: 2000000000 + crypto.randomInt(1000000) });
  check("unknown product: 'Could not find the product.'", failedWith(res, NO_PRODUCT), () => show(res));
  res = await activate('ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ', mc1);
  check("unknown key: 'Could not find the key.'", failedWith(res, NO_KEY), () => show(res));
  res = await until('Activate a key of another product (waiting for seeded data)',
    () => activate(kOther.key, mc1, { product: pid2 }), propagated);
  check('key of product 2 activates under product 2', res.lic !== null, () => `rejected: ${res.err}`);
  res = await activate(kOther.key, mc1);
  check("key of product 2 under product 1: 'Could not find the key.'", failedWith(res, NO_KEY), () => show(res));

  // --- 10. token scopes -------------------------------------------------------------------------
  res = await until('Activate with a GetKey-only token (waiting for seeded data)',
    () => activate(key, mc1, { token: tokGetKey }), propagated);
  check("GetKey-only token: Activate rejected with 'Access denied.'", failedWith(res, DENIED), () => show(res));
  res = await getKey(key, { token: tokGetKey });
  check('GetKey-only token: GetKey succeeds', res.lic !== null, () => `rejected: ${res.err}`);

  // --- 11. CreateTrialKey -----------------------------------------------------------------------
  // npm 1.0.11 resolves null on a 200 error body and rejects with got's generic HTTPError on 4xx.
  const mct = machineCode();
  const trial = (mc) => attempt(() => quietly(() => Key.CreateTrialKey(tok, pid, mc, URL)));
  res = await trial(mct);
  const trialKey = res.lic;
  check('CreateTrialKey: returns a key string', typeof trialKey === 'string' && trialKey.length > 0,
    () => `${show(res)} ${res.error && res.error.response ? res.error.response.body : ''}`);
  res = await trial(mct);
  check('CreateTrialKey again, same machine: same key', res.lic === trialKey, () => show(res));
  res = await until('Activate the trial key', () => activate(trialKey, mct), propagated);
  check('Activate trial key on its machine: success, IsOnRightMachineCustom, not expired',
    res.lic !== null && (await quietly(() => onMachine(res.lic, mct))) && res.lic.Expires > nowSecs(),
    () => (res.lic === null ? `rejected: ${res.err}` : `machines ${show(mids(res.lic))}, Expires ${res.lic.Expires}`));

  finish(0);
}

main().catch((e) => {
  if (e instanceof Failure) {
    console.log(e.message);
  } else {
    console.log(`FAIL unexpected exception: ${e && e.stack ? e.stack : e}`);
  }
  finish(1);
});
