"""Finding strategy plugins through real entry points, and skipping broken ones.

The installed plugins are the two packages under plugins/, installed into the venv by
scripts/setup.sh. Broken plugins are throwaway distributions written to tmp_path: a
`<name>.dist-info` directory with METADATA and entry_points.txt beside a module, on sys.path,
is a distribution that `importlib.metadata` finds like any installed one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shardsmith.cli import app
from shardsmith.errors import LayoutError, PlanError
from shardsmith.plan import loads_plan, resolve_full, resolve_slices
from shardsmith.plugins import (
    BUILTIN_SOURCE,
    ENTRY_POINT_GROUP,
    PLUGINS_ENV,
    get_registry,
    load_registry,
    reset_registry,
)

BUILTINS = ["column", "grid", "mirror", "replicate", "row", "tensor_map"]
INSTALLED = {
    "fused_qkv": ("shardsmith-fused-qkv", "shardsmith_fused_qkv"),
    "padded_vocab": ("shardsmith-padded-vocab", "shardsmith_padded_vocab"),
}

# A valid strategy for throwaway plugins to register: replicates like the built-in one.
GOOD_STRATEGY = """
from shardsmith.hookspecs import hookimpl
from shardsmith.layout import Layout
from shardsmith.strategies.base import Strategy


class {cls}(Strategy):
    name = "{name}"

    def layout(self, full_shape, world_size, ctx):
        return Layout.replicated(full_shape, world_size)

    def full_shape(self, slice_shapes, world_size, ctx):
        return tuple(slice_shapes[0])
"""


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch, tmp_path):
    """Start every test from an unset SHARDSMITH_PLUGINS and no loaded registry, and forget it after.

    Modules imported from tmp_path are dropped too, so the next test imports its own version.
    """
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_registry()
    modules_before = set(sys.modules)
    yield
    reset_registry()
    for name in set(sys.modules) - modules_before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path that throwaway distributions are written into."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def add_distribution(site, distribution, entry_point, module, source, *, target=None):
    """Write a distribution `distribution` 0.1 whose entry point `entry_point` loads `module`."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{distribution.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_point} = {target or module}\n")


def broken_by_name(registry):
    return {broken.entry_point: broken for broken in registry.broken}


def test_installed_entry_points():
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}

    for name, (distribution, module) in INSTALLED.items():
        assert name in found, f"entry point '{name}' is not installed; run scripts/setup.sh"
        assert found[name].value == module
        assert found[name].dist.metadata["Name"] == distribution


def test_installed_plugins_registered():
    registry = get_registry()

    assert registry.broken == []
    assert sorted(registry.names()) == sorted(BUILTINS + list(INSTALLED))
    for name, (distribution, _) in INSTALLED.items():
        version = metadata.version(distribution)
        assert registry.source(name) == f"{distribution} {version} (entry point '{name}')"
    for name in BUILTINS:
        assert registry.source(name) == BUILTIN_SOURCE


def test_registry_loaded_once():
    assert get_registry() is get_registry()


def test_reset_registry_scans_again(monkeypatch):
    assert "fused_qkv" in get_registry()
    monkeypatch.setenv(PLUGINS_ENV, "")

    reset_registry()

    assert "fused_qkv" not in get_registry()


def test_import_failure_reported(site):
    add_distribution(
        site,
        "shardsmith-broken-import",
        "broken_import",
        "throwaway_broken_import",
        "import throwaway_missing_dependency\n",
    )

    registry = load_registry()

    broken = broken_by_name(registry)["broken_import"]
    assert broken.distribution == "shardsmith-broken-import 0.1"
    assert broken.cause == "import failed: ModuleNotFoundError: No module named 'throwaway_missing_dependency'"
    assert str(broken) == (
        "plugin 'broken_import' from shardsmith-broken-import 0.1 was skipped: import failed: "
        "ModuleNotFoundError: No module named 'throwaway_missing_dependency'"
    )
    assert sorted(registry.names()) == sorted(BUILTINS + list(INSTALLED))


def test_raising_hook_reported(site):
    source = GOOD_STRATEGY.format(cls="Early", name="early") + """

@hookimpl
def register_strategies(register):
    register(Early)
    raise RuntimeError("configuration file ~/.early.toml not found")
"""
    add_distribution(site, "shardsmith-raising", "raising", "throwaway_raising", source)

    registry = load_registry()

    broken = broken_by_name(registry)["raising"]
    assert broken.distribution == "shardsmith-raising 0.1"
    assert broken.cause == "RuntimeError: configuration file ~/.early.toml not found"
    # What the hook registered before it raised is taken back, so a half-loaded plugin never runs.
    assert "early" not in registry


def test_duplicate_of_builtin_reported(site):
    source = GOOD_STRATEGY.format(cls="MyRow", name="row") + """

@hookimpl
def register_strategies(register):
    register(MyRow)
"""
    add_distribution(site, "shardsmith-my-row", "my_row", "throwaway_my_row", source)

    registry = load_registry()

    broken = broken_by_name(registry)["my_row"]
    assert broken.distribution == "shardsmith-my-row 0.1"
    assert broken.cause == (
        "strategy name 'row' is registered twice: by shardsmith.strategies.row.Row from shardsmith (built-in) "
        "and by throwaway_my_row.MyRow from shardsmith-my-row 0.1 (entry point 'my_row')"
    )
    assert registry.get("row").__module__ == "shardsmith.strategies.row"


def test_duplicate_between_plugins_reported(site):
    for letter in ("a", "b"):
        source = GOOD_STRATEGY.format(cls="Twin", name="twin") + """

@hookimpl
def register_strategies(register):
    register(Twin)
"""
        add_distribution(site, f"shardsmith-twin-{letter}", f"twin_{letter}", f"throwaway_twin_{letter}", source)

    registry = load_registry()

    broken = broken_by_name(registry)
    assert len([name for name in ("twin_a", "twin_b") if name in broken]) == 1
    loser = broken.get("twin_a") or broken.get("twin_b")
    assert "strategy name 'twin' is registered twice" in loser.cause
    assert "from shardsmith-twin-a 0.1 (entry point 'twin_a')" in loser.cause
    assert "from shardsmith-twin-b 0.1 (entry point 'twin_b')" in loser.cause
    assert "twin" in registry


def test_misspelled_hook_reported(site):
    source = GOOD_STRATEGY.format(cls="Typo", name="typo") + """

@hookimpl
def register_strategy(register):
    register(Typo)
"""
    add_distribution(site, "shardsmith-typo", "typo", "throwaway_typo", source)

    registry = load_registry()

    broken = broken_by_name(registry)["typo"]
    assert broken.distribution == "shardsmith-typo 0.1"
    assert broken.cause.startswith("unknown hook")
    assert "the hook is named 'register_strategies'" in broken.cause
    assert "register_strategy" in broken.cause
    assert "typo" not in registry


def test_non_strategy_registration_reported(site):
    source = """
from shardsmith.hookspecs import hookimpl


class NotAStrategy:
    name = "plain"


@hookimpl
def register_strategies(register):
    register(NotAStrategy)
"""
    add_distribution(site, "shardsmith-plain", "plain", "throwaway_plain", source)

    registry = load_registry()

    cause = broken_by_name(registry)["plain"].cause
    assert "registered <class 'throwaway_plain.NotAStrategy'>, which is not a subclass of shardsmith Strategy" in cause
    assert "plain" not in registry


def test_nameless_strategy_reported(site):
    source = GOOD_STRATEGY.format(cls="Nameless", name="") + """

@hookimpl
def register_strategies(register):
    register(Nameless)
"""
    add_distribution(site, "shardsmith-nameless", "nameless", "throwaway_nameless", source)

    registry = load_registry()

    assert "registered Nameless without a 'name' attribute" in broken_by_name(registry)["nameless"].cause


def test_plugin_object_entry_point(site):
    # An entry point may name an object inside a module instead of the module itself.
    source = GOOD_STRATEGY.format(cls="Boxed", name="boxed") + """

class Plugin:
    @hookimpl
    def register_strategies(self, register):
        register(Boxed)


plugin = Plugin()
"""
    add_distribution(site, "shardsmith-boxed", "boxed", "throwaway_boxed", source, target="throwaway_boxed:plugin")

    registry = load_registry()

    assert registry.broken == []
    assert registry.source("boxed") == "shardsmith-boxed 0.1 (entry point 'boxed')"


def test_broken_plugins_logged(site, caplog):
    add_distribution(site, "shardsmith-broken-import", "broken_import", "throwaway_broken_log", "raise ValueError('bad')\n")

    with caplog.at_level(logging.WARNING, logger="shardsmith.plugins"):
        load_registry()

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "plugin 'broken_import' from shardsmith-broken-import 0.1 was skipped: import failed: ValueError: bad"
    ]


def test_broken_plugin_leaves_others_usable(site):
    add_distribution(site, "shardsmith-broken-import", "broken_import", "throwaway_broken_other", "raise ValueError('bad')\n")
    plan_text = 'world_size = 2\n[[param]]\nmatch = "qkv"\nstrategy = "fused_qkv"\nheads = 2\n'

    plan = loads_plan(plan_text)

    assert plan.rules[0].strategy == "fused_qkv"
    assert "broken_import" in broken_by_name(get_registry())


def test_env_empty_loads_no_plugins(site, monkeypatch):
    add_distribution(site, "shardsmith-broken-import", "broken_import", "throwaway_broken_env", "raise ValueError('bad')\n")
    monkeypatch.setenv(PLUGINS_ENV, "")

    registry = load_registry()

    assert sorted(registry.names()) == BUILTINS
    assert registry.broken == []


def test_env_selects_named_plugins(site, monkeypatch):
    add_distribution(site, "shardsmith-broken-import", "broken_import", "throwaway_broken_select", "raise ValueError('bad')\n")
    monkeypatch.setenv(PLUGINS_ENV, "fused_qkv")

    registry = load_registry()

    assert sorted(registry.names()) == sorted(BUILTINS + ["fused_qkv"])
    assert registry.broken == []


def test_env_list_with_spaces(monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, " padded_vocab , fused_qkv ,")

    registry = load_registry()

    assert sorted(registry.names()) == sorted(BUILTINS + list(INSTALLED))


def test_env_selects_entry_point_not_strategy(site, monkeypatch):
    # The variable names entry points; one entry point may register strategies under other names.
    source = GOOD_STRATEGY.format(cls="Inner", name="inner_strategy") + """

@hookimpl
def register_strategies(register):
    register(Inner)
"""
    add_distribution(site, "shardsmith-outer", "outer", "throwaway_outer", source)
    monkeypatch.setenv(PLUGINS_ENV, "inner_strategy")
    assert "inner_strategy" not in load_registry()

    monkeypatch.setenv(PLUGINS_ENV, "outer")
    assert "inner_strategy" in load_registry()


def test_builtins_ignore_env(monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, "fused_qkv")

    registry = load_registry(entry_points=False)

    assert sorted(registry.names()) == BUILTINS


def test_plan_names_missing_strategy(monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, "")
    plan_text = 'world_size = 2\n[[param]]\nmatch = "attn.qkv.*"\nstrategy = "fused_qkv"\nheads = 2\n'

    with pytest.raises(PlanError) as info:
        loads_plan(plan_text)

    assert str(info.value) == (
        "rule 1 (match = 'attn.qkv.*'): unknown strategy 'fused_qkv' "
        "(installed: column, grid, mirror, replicate, row, tensor_map). "
        "Install the plugin that provides it, or check SHARDSMITH_PLUGINS"
    )


def test_plan_missing_strategy_lists_plugins():
    plan_text = 'world_size = 2\n[[param]]\nmatch = "*"\nstrategy = "fused_qvk"\n'

    with pytest.raises(PlanError, match=r"installed: column, fused_qkv, grid, mirror, padded_vocab, replicate"):
        loads_plan(plan_text)


def test_strategies_command_lists_sources(site):
    add_distribution(site, "shardsmith-broken-import", "broken_import", "throwaway_broken_cli", "raise ValueError('bad')\n")

    result = CliRunner().invoke(app, ["strategies", "--json"])

    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    sources = {row["name"]: row["source"] for row in listing["strategies"]}
    assert sources["fused_qkv"] == f"shardsmith-fused-qkv {metadata.version('shardsmith-fused-qkv')} (entry point 'fused_qkv')"
    assert sources["row"] == BUILTIN_SOURCE
    assert listing["broken_plugins"] == [
        {
            "entry_point": "broken_import",
            "distribution": "shardsmith-broken-import 0.1",
            "cause": "import failed: ValueError: bad",
        }
    ]
    options = {row["name"]: [option["name"] for option in row["options"]] for row in listing["strategies"]}
    assert options["fused_qkv"] == ["heads", "query_heads", "kv_groups", "parts"]
    assert options["padded_vocab"] == ["vocab_size", "keep_padding", "parts"]


def test_strategies_command_warns_on_stderr(site):
    add_distribution(site, "shardsmith-broken-import", "broken_import", "throwaway_broken_warn", "raise ValueError('bad')\n")

    result = CliRunner().invoke(app, ["strategies"])

    assert result.exit_code == 0, result.output
    assert "plugin 'broken_import' from shardsmith-broken-import 0.1 was skipped" in result.stderr
    assert "broken_import" not in result.stdout


def guide_block(language, containing):
    """Return the one fenced `language` block of docs/plugins.md that contains `containing`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    matching = [block for block in blocks if containing in block]
    assert len(matching) == 1, f"docs/plugins.md has {len(matching)} {language} blocks containing {containing!r}"
    return matching[0]


def test_guide_entry_point_snippet():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python < 3.11 only
        import tomli as tomllib

    pyproject = tomllib.loads(guide_block("toml", "[project.entry-points.shardsmith]"))

    assert pyproject["project"]["entry-points"][ENTRY_POINT_GROUP] == {"fused_gate_up": "shardsmith_fused_gate_up"}


def test_guide_plugin_loads(site):
    add_distribution(
        site,
        "shardsmith-fused-gate-up",
        "fused_gate_up",
        "shardsmith_fused_gate_up",
        guide_block("python", "class FusedGateUp"),
    )

    registry = load_registry()

    assert registry.broken == []
    assert registry.source("fused_gate_up") == "shardsmith-fused-gate-up 0.1 (entry point 'fused_gate_up')"


def test_guide_plugin_layout(site):
    add_distribution(
        site,
        "shardsmith-fused-gate-up",
        "fused_gate_up",
        "shardsmith_fused_gate_up",
        guide_block("python", "class FusedGateUp"),
    )
    registry = load_registry()
    plan = loads_plan('world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "fused_gate_up"\nparts = 2\n', registry=registry)

    layout = resolve_full(plan, ["w"], {"w": "Float32"}, {"w": (8, 3)}, registry=registry)["w"].layout

    # Gate is rows 0-3 and up rows 4-7; part 1 (ranks 1 and 3) holds gate rows 2-3 and up rows 6-7.
    assert layout.slice_shapes == ((4, 3),) * 4
    for rank in (1, 3):
        assert [(p.full.start[0], p.full.stop[0]) for p in layout.pieces[rank]] == [(2, 4), (6, 8)]
        assert [(p.local.start[0], p.local.stop[0]) for p in layout.pieces[rank]] == [(0, 2), (2, 4)]
    merged = resolve_slices(plan, ["w"], {"w": "Float32"}, {"w": [(4, 3)] * 4}, registry=registry)["w"]
    assert merged.full_shape == (8, 3)
    with pytest.raises(LayoutError, match="dim 0 of size 6 does not split into 2 halves of 2 blocks each"):
        resolve_full(plan, ["w"], {"w": "Float32"}, {"w": (6, 3)}, registry=registry)


def test_guide_testing_snippet(site):
    add_distribution(
        site,
        "shardsmith-fused-gate-up",
        "fused_gate_up",
        "shardsmith_fused_gate_up",
        guide_block("python", "class FusedGateUp"),
    )
    namespace = {}

    exec(guide_block("python", "load_registry(entry_points=False)"), namespace)
    exec(guide_block("python", "def split_by_layout"), namespace)

    full = np.arange(16, dtype=np.float32).reshape(8, 2)
    slices = namespace["split_by_layout"](full, namespace["layout"])
    np.testing.assert_array_equal(slices[1], full[[2, 3, 6, 7]])
