from emoe.rpc import protogen


def test_committed_stubs_match_the_protos():
    generated = protogen.generate()
    committed = {p.name: p.read_text() for p in protogen.STUB_DIR.glob("*_pb2*")}
    assert set(generated) == set(committed), "run: python -m emoe.rpc.protogen"
    stale = [name for name, text in generated.items() if committed[name] != text]
    assert not stale, f"stale stubs {stale}; run: python -m emoe.rpc.protogen"


def test_stubs_import_each_other_inside_the_package():
    for name, text in protogen.generate().items():
        assert "from emoe.v1 import" not in text, name
