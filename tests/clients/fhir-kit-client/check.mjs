// Drives a live server with fhir-kit-client, unchanged, as a Node HIS integration would.
//
//   FHIR_BASE_URL=http://127.0.0.1:8080/fhir FHIR_TOKEN=... node check.mjs
//   node check.mjs http://127.0.0.1:8080/fhir TOKEN
//
// Prints one JSON object, {"ok": bool, "steps": {name: {"ok": bool, ...}}}, and exits 1 when any
// expectation failed (2 on a usage error). Run by tests/test_live_server.py.
import { Client } from 'fhir-kit-client';

const baseUrl = process.argv[2] ?? process.env.FHIR_BASE_URL;
const token = process.argv[3] ?? process.env.FHIR_TOKEN;
if (!baseUrl || !token) {
  console.error('usage: node check.mjs BASE_URL TOKEN (or FHIR_BASE_URL and FHIR_TOKEN)');
  process.exit(2);
}

const client = new Client({ baseUrl, bearerToken: token });
const steps = {};

class Failed extends Error {}

function expect(condition, message) {
  if (!condition) throw new Failed(message);
}

async function step(name, body) {
  try {
    const details = (await body()) ?? {};
    steps[name] = { ok: true, ...details };
    return details;
  } catch (error) {
    const response = error.response;
    steps[name] = {
      ok: false,
      error: error.message,
      ...(response ? { status: response.status, body: response.data } : {}),
    };
    return undefined;
  }
}

const ids = (bundle) => (bundle.entry ?? []).map((e) => e.resource?.id);
const suffix = Math.random().toString(16).slice(2, 10);
const identifier = { system: 'urn:fhir-kit-client-check', value: suffix };
const family = `测试${suffix}`;
let created;

await step('capabilityStatement', async () => {
  const cs = await client.capabilityStatement();
  expect(cs.resourceType === 'CapabilityStatement', `resourceType ${cs.resourceType}`);
  expect(cs.fhirVersion === '4.0.1', `fhirVersion ${cs.fhirVersion}`);
  const types = cs.rest?.[0]?.resource?.map((r) => r.type) ?? [];
  expect(types.includes('Patient'), 'Patient is not in the CapabilityStatement');
  return { fhirVersion: cs.fhirVersion, resourceTypes: types.length };
});

await step('searchAndNextPage', async () => {
  const first = await client.search({ resourceType: 'Patient', searchParams: { _count: 2 } });
  expect(first.resourceType === 'Bundle' && first.type === 'searchset', `not a searchset: ${first.type}`);
  expect(first.entry?.length === 2, `first page has ${first.entry?.length} entries`);
  const next = client.nextPage({ bundle: first });
  expect(next !== undefined, 'first page has no next link');
  const second = await next;
  expect(second.entry?.length === 2, `second page has ${second.entry?.length} entries`);
  const overlap = ids(first).filter((id) => ids(second).includes(id));
  expect(overlap.length === 0, `pages overlap: ${overlap}`);
  const back = client.prevPage({ bundle: second });
  const previous = back ? await back : undefined;
  return {
    firstPage: ids(first),
    secondPage: ids(second),
    previousPage: previous ? ids(previous) : null,
  };
});

await step('create', async () => {
  created = await client.create({
    resourceType: 'Patient',
    body: {
      resourceType: 'Patient',
      identifier: [identifier],
      name: [{ family, given: ['小红'] }],
      gender: 'female',
      birthDate: '1990-03-04',
    },
  });
  expect(created.resourceType === 'Patient' && created.id, 'create returned no Patient with an id');
  expect(created.meta?.versionId === '1', `versionId ${created.meta?.versionId}`);
  return { id: created.id, versionId: created.meta.versionId };
});

if (created?.id) {
  const { id } = created;

  await step('read', async () => {
    const patient = await client.read({ resourceType: 'Patient', id });
    expect(patient.id === id, `read ${patient.id}`);
    expect(patient.name?.[0]?.family === family, `family ${patient.name?.[0]?.family}`);
    return { id: patient.id, family: patient.name[0].family, versionId: patient.meta?.versionId };
  });

  await step('update', async () => {
    const updated = await client.update({
      resourceType: 'Patient',
      id,
      body: { ...created, meta: undefined, birthDate: '1990-03-05' },
    });
    expect(updated.meta?.versionId === '2', `versionId ${updated.meta?.versionId}`);
    expect(updated.birthDate === '1990-03-05', `birthDate ${updated.birthDate}`);
    const reread = await client.read({ resourceType: 'Patient', id });
    expect(reread.birthDate === '1990-03-05', `read back birthDate ${reread.birthDate}`);
    return { versionId: updated.meta.versionId, birthDate: reread.birthDate };
  });

  await step('vread', async () => {
    const v1 = await client.vread({ resourceType: 'Patient', id, version: '1' });
    expect(v1.meta?.versionId === '1', `versionId ${v1.meta?.versionId}`);
    expect(v1.birthDate === '1990-03-04', `version 1 birthDate ${v1.birthDate}`);
    return { versionId: v1.meta.versionId, birthDate: v1.birthDate };
  });

  await step('searchByIdentifierAndName', async () => {
    const byIdentifier = await client.search({
      resourceType: 'Patient',
      searchParams: { identifier: `${identifier.system}|${identifier.value}` },
    });
    expect(JSON.stringify(ids(byIdentifier)) === JSON.stringify([id]), `by identifier: ${ids(byIdentifier)}`);
    const byName = await client.search({ resourceType: 'Patient', searchParams: { family } });
    expect(JSON.stringify(ids(byName)) === JSON.stringify([id]), `by family: ${ids(byName)}`);
    // POST [type]/_search with a form body, as the client sends it with postSearch.
    const posted = await client.search({
      resourceType: 'Patient',
      searchParams: { family, birthdate: 'ge1990-03-05' },
      options: { postSearch: true },
    });
    expect(JSON.stringify(ids(posted)) === JSON.stringify([id]), `POST _search: ${ids(posted)}`);
    return { byIdentifier: ids(byIdentifier), byName: ids(byName), postSearch: ids(posted) };
  });

  await step('jsonPatch', async () => {
    const patched = await client.patch({
      resourceType: 'Patient',
      id,
      jsonPatch: [{ op: 'replace', path: '/gender', value: 'other' }],
    });
    expect(patched.gender === 'other', `gender ${patched.gender}`);
    expect(patched.meta?.versionId === '3', `versionId ${patched.meta?.versionId}`);
    return { gender: patched.gender, versionId: patched.meta.versionId };
  });

  await step('history', async () => {
    const history = await client.history({ resourceType: 'Patient', id });
    expect(history.type === 'history', `type ${history.type}`);
    const versions = (history.entry ?? []).map((e) => e.resource?.meta?.versionId);
    expect(versions.length === 3, `versions ${versions}`);
    return { versions };
  });
}

async function expectError(call, status) {
  try {
    await call();
  } catch (error) {
    const response = error.response;
    expect(response, `no response on the error: ${error.message}`);
    expect(response.status === status, `status ${response.status}, expected ${status}`);
    expect(response.data?.resourceType === 'OperationOutcome', 'the error body is not an OperationOutcome');
    const issue = response.data.issue?.[0] ?? {};
    expect(issue.severity && issue.code, 'the OperationOutcome has no issue with severity and code');
    return { status: response.status, code: issue.code, diagnostics: issue.diagnostics ?? issue.details?.text };
  }
  throw new Failed(`expected HTTP ${status}, the call succeeded`);
}

await step('readUnknownId', () =>
  expectError(() => client.read({ resourceType: 'Patient', id: `no-such-patient-${suffix}` }), 404),
);

await step('batch', async () => {
  const result = await client.batch({
    body: {
      resourceType: 'Bundle',
      type: 'batch',
      entry: [
        {
          resource: { resourceType: 'Patient', name: [{ family: `${family}批`, given: ['一'] }], gender: 'male' },
          request: { method: 'POST', url: 'Patient' },
        },
        { request: { method: 'GET', url: `Patient?family=${encodeURIComponent(family)}` } },
        { request: { method: 'GET', url: `Patient/no-such-patient-${suffix}` } },
      ],
    },
  });
  expect(result.resourceType === 'Bundle' && result.type === 'batch-response', `type ${result.type}`);
  const statuses = (result.entry ?? []).map((e) => e.response?.status ?? '');
  expect(statuses.length === 3, `entries ${statuses.length}`);
  expect(statuses[0].startsWith('201'), `POST entry ${statuses[0]}`);
  expect(statuses[1].startsWith('200'), `GET search entry ${statuses[1]}`);
  expect(statuses[2].startsWith('404'), `GET unknown entry ${statuses[2]}`);
  const outcome = result.entry[2].response.outcome;
  expect(outcome?.resourceType === 'OperationOutcome', 'the 404 entry has no OperationOutcome');
  const searchset = result.entry[1].resource;
  expect(searchset?.type === 'searchset' && ids(searchset).includes(created?.id), 'search entry misses the Patient');
  return { statuses, location: result.entry[0].response.location, notFoundCode: outcome.issue?.[0]?.code };
});

if (created?.id) {
  await step('deleteThenGone', async () => {
    await client.delete({ resourceType: 'Patient', id: created.id });
    return expectError(() => client.read({ resourceType: 'Patient', id: created.id }), 410);
  });
}

const ok = Object.keys(steps).length > 0 && Object.values(steps).every((s) => s.ok);
process.stdout.write(`${JSON.stringify({ ok, steps })}\n`);
process.exit(ok ? 0 : 1);
