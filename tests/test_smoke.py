async def test_smoke(api):
    r = await api.post("Patient", {"resourceType": "Patient", "name": [{"family": "张", "given": ["伟"]}], "gender": "male"})
    print(r.status_code, r.headers, r.text)
    assert r.status_code == 201
    r2 = await api.get(r.headers["location"].split("/fhir/")[1].split("/_history")[0])
    print(r2.text)
    r3 = await api.get("Patient?name=张伟")
    print(r3.text)
    r4 = await api.client.get("/fhir/metadata")
    print(r4.status_code, r4.text[:300])
