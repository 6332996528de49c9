"""The host inventory: location, round trips, and errors that name the line, host and field."""

import stat

import pytest

from megafleet import paths
from megafleet.errors import UsageError, ValidationError
from megafleet.inventory import Host, Inventory, parse_target


def write(path, text):
    path.write_text(text)
    return path


def test_missing_file_is_an_empty_inventory(megafleet_home):
    inv = Inventory.load()
    assert len(inv) == 0 and inv.path == megafleet_home / "hosts.yaml"


def test_project_local_file_wins_over_the_users(megafleet_home, tmp_path):
    write(megafleet_home / "hosts.yaml", "hosts:\n  a: {address: 10.0.0.1, user: u}\n")
    assert Inventory.load().names() == ["a"]
    write(tmp_path / "megafleet.yaml", "hosts:\n  b: {address: 10.0.0.2, user: u}\n")
    assert paths.inventory_path() == tmp_path / "megafleet.yaml"
    assert Inventory.load().names() == ["b"]


def test_save_is_private_commented_and_loads_back_unchanged(megafleet_home):
    inv = Inventory.load()
    inv.add(
        Host(
            "gpu1",
            "203.0.113.7",
            user="ubuntu",
            port=2222,
            identity_file="/k/id",
            private_address="10.0.1.7",
            tags={"role": "trainer"},
        )
    )
    inv.add(Host("gpu2", "gpu2.example.com", user="ubuntu", jump_host="gpu1"))
    path = inv.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# megafleet host inventory")
    again = Inventory.load()
    assert again.hosts == inv.hosts
    assert again.jump_for(again.get("gpu2")).name == "gpu1"


def test_relative_identity_file_is_relative_to_the_inventory(megafleet_home):
    write(
        megafleet_home / "hosts.yaml",
        "hosts:\n  a: {address: h, user: u, identity_file: keys/id}\n",
    )
    assert Inventory.load().get("a").identity_file == str(megafleet_home / "keys" / "id")


def test_every_bad_field_is_named_with_its_line(megafleet_home):
    path = write(
        megafleet_home / "hosts.yaml",
        """\
hosts:
  good: {address: 10.0.0.1, user: u}
  bad:
    address: "not an address"
    user: u
    port: 70000
    colour: blue
  noaddr:
    user: u
""",
    )
    with pytest.raises(ValidationError) as e:
        Inventory.load()
    found = {(p.field, p.line) for p in e.value.problems}
    assert ("hosts.bad.address", 4) in found
    assert ("hosts.bad.port", 6) in found
    assert ("hosts.bad.colour", 7) in found
    assert ("hosts.noaddr.address", 8) in found
    assert f"{path}:6: hosts.bad.port" in str(e.value)


def test_malformed_yaml_names_the_line(megafleet_home):
    path = write(
        megafleet_home / "hosts.yaml", "hosts:\n  a:\n    address: 10.0.0.1\n   user: [u\n"
    )
    with pytest.raises(ValidationError) as e:
        Inventory.load()
    problem = e.value.problems[0]
    assert problem.source == str(path) and problem.line == 4
    assert f"{path}:4:" in str(e.value) and e.value.exit_code == 2


def test_a_host_name_given_twice_is_an_error_with_both_lines(megafleet_home):
    """YAML would silently keep the second entry: two "nodes" on one machine, a job that hangs."""
    path = write(
        megafleet_home / "hosts.yaml",
        "hosts:\n  gpu1:\n    address: 10.0.0.1\n"
        "  gpu2:\n    address: 10.0.0.2\n  gpu1:\n    address: 10.0.0.3\n",
    )
    with pytest.raises(ValidationError) as e:
        Inventory.load()
    (problem,) = e.value.problems
    assert (problem.field, problem.source, problem.line) == ("hosts.gpu1", str(path), 6)
    assert "defined 2 times (lines 2, 6)" in problem.message
    assert "one entry per name" in e.value.hint


def test_top_level_and_type_errors(megafleet_home):
    write(megafleet_home / "hosts.yaml", "host:\n  a: {address: h}\n")
    with pytest.raises(ValidationError, match=r"hosts.yaml:1: host: unknown top-level key"):
        Inventory.load()
    write(megafleet_home / "hosts.yaml", "hosts:\n  - a\n")
    with pytest.raises(ValidationError, match="hosts: must map host names"):
        Inventory.load()
    write(megafleet_home / "hosts.yaml", "hosts:\n  a: {address: h, user: u, tags: {x: [1]}}\n")
    with pytest.raises(ValidationError, match="hosts.a.tags"):
        Inventory.load()


def test_jump_host_loops_are_refused(megafleet_home):
    write(
        megafleet_home / "hosts.yaml",
        """\
hosts:
  a: {address: h1, user: u, jump_host: b}
  b: {address: h2, user: u, jump_host: a}
""",
    )
    with pytest.raises(
        ValidationError, match="hosts.yaml:2: hosts.a.jump_host: jump hosts form a loop"
    ):
        Inventory.load()
    with pytest.raises(ValidationError, match="its own jump host"):
        Inventory().add(Host("c", "h", user="u", jump_host="c"))


def test_add_remove_select(megafleet_home):
    inv = Inventory()
    inv.add(Host("a", "10.0.0.1", user="u"))
    inv.add(Host("b", "10.0.0.2", user="u", jump_host="a"))
    with pytest.raises(UsageError, match="already in"):
        inv.add(Host("a", "10.0.0.9", user="u"))
    inv.add(Host("a", "10.0.0.9", user="u"), replace=True)
    assert inv.get("a").address == "10.0.0.9"
    assert [h.name for h in inv.select(["b", "a", "b"])] == ["b", "a"]
    with pytest.raises(UsageError, match="unknown host.*nope") as e:
        inv.select(["nope"])
    assert "known hosts: a, b" in e.value.hint
    with pytest.raises(UsageError, match="jump host of b"):
        inv.remove("a")
    inv.remove("b")
    assert inv.names() == ["a"]
    with pytest.raises(ValidationError, match="hosts.x.port"):
        inv.add(Host("x", "h", user="u", port=0))


def test_jump_host_given_as_target(megafleet_home):
    inv = Inventory(
        [Host("a", "10.0.0.1", user="u", identity_file="/k", jump_host="ops@bastion:2222")]
    )
    jump = inv.jump_for(inv.get("a"))
    assert (jump.user, jump.address, jump.port, jump.identity_file) == (
        "ops",
        "bastion",
        2222,
        "/k",
    )


@pytest.mark.parametrize(
    "spec,want",
    [
        ("10.0.0.1", (None, "10.0.0.1", None)),
        ("ubuntu@h.example.com:2222", ("ubuntu", "h.example.com", 2222)),
        ("u@[fe80::1]:22", ("u", "fe80::1", 22)),
        ("fe80::1", (None, "fe80::1", None)),
    ],
)
def test_parse_target(spec, want):
    assert parse_target(spec) == want


def test_parse_target_rejects_bad_port():
    with pytest.raises(ValueError, match="not a number"):
        parse_target("h:ssh")
