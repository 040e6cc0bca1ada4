"""Configuration layering, validation, redaction and generated docs (spawnmesh.config)."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh import config as config_module
from spawnmesh.config import (
    ActorsConfig,
    NodeConfig,
    OpsConfig,
    SettingDoc,
    StatestoreConfig,
    load_config,
    redacted,
    render_docs_markdown,
    setting,
    settings,
    to_toml,
)
from spawnmesh.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spawnmesh.toml"
    path.write_text(text)
    return path


def error_of(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    return info.value


# --- defaults and the required API ---------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    cfg = load_config(env={})
    assert cfg == NodeConfig()
    assert cfg.name == "" and cfg.app == ""
    assert cfg.ops == OpsConfig(host="127.0.0.1", port=9090)
    assert cfg.actors.default_timeout_ms == 30_000
    assert cfg.actors.max_queue_per_actor == 1_024
    assert cfg.actors.max_queued_per_node == 100_000
    assert cfg.actors.deactivate_after_ms == 60_000
    assert cfg.actors.sweep_interval_ms == 1_000
    assert cfg.actors.write_behind_ms == 1_000
    assert cfg.actors.write_batch_max == 1_000
    assert cfg.actors.shutdown_grace_ms == 10_000
    assert cfg.statestore == StatestoreConfig()
    assert cfg.statestore.url == "sqlite:///.spawnmesh/state.db"
    assert cfg.statestore.key == "" and not cfg.statestore.allow_plaintext
    assert cfg.statestore.pool_size == 8
    assert (cfg.log.format, cfg.log.level) == ("human", "info")


def test_config_is_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ops.port = 1  # type: ignore[misc]


# --- precedence ------------------------------------------------------------------------------


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'name = "from-file"\n'
        '[ops]\nport = 9001\nhost = "10.0.0.1"\n'
        "[actors]\ndefault_timeout_ms = 1000\nmax_queue_per_actor = 11\n"
        '[log]\nlevel = "debug"\n',
    )
    env = {
        "SPAWNMESH_NAME": "from-env",
        "SPAWNMESH_OPS_PORT": "9002",
        "SPAWNMESH_ACTORS_DEFAULT_TIMEOUT_MS": "2000",
    }
    overrides = {"ops.port": 9003, "actors.default_timeout_ms": "3000"}

    assert load_config(env={}, file=path).ops.port == 9001
    assert load_config(env=env, file=path).ops.port == 9002
    cfg = load_config(env=env, file=path, overrides=overrides)
    assert cfg.ops.port == 9003  # flag > env > file
    assert cfg.actors.default_timeout_ms == 3000  # nested, flag (string parsed like env)
    assert cfg.name == "from-env"  # top level: env > file
    assert cfg.ops.host == "10.0.0.1"  # file > default
    assert cfg.actors.max_queue_per_actor == 11  # file > default
    assert cfg.log.level == "debug"
    assert cfg.log.format == "human"  # default
    assert cfg.actors.sweep_interval_ms == 1_000  # default, sibling of overridden fields


def test_file_from_spawnmesh_config_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[statestore]\nurl = "memory://"\n')
    assert load_config(env={"SPAWNMESH_CONFIG": str(path)}).statestore.url == "memory://"
    other = tmp_path / "other.toml"
    other.write_text("[statestore]\npool_size = 3\n")
    cfg = load_config(env={"SPAWNMESH_CONFIG": str(path)}, file=other)  # explicit file wins
    assert cfg.statestore.url != "memory://" and cfg.statestore.pool_size == 3


def test_bool_spellings() -> None:
    for text, want in [("true", True), ("1", True), ("YES", True), ("on", True),
                       ("false", False), ("0", False), ("no", False), ("Off", False)]:  # fmt: skip
        env = {"SPAWNMESH_STATESTORE_ALLOW_PLAINTEXT": text}
        assert load_config(env=env).statestore.allow_plaintext is want


def test_choices_are_case_insensitive_and_normalised() -> None:
    assert load_config(env={"SPAWNMESH_LOG_LEVEL": "WARNING"}).log.level == "warning"


def test_ints_accept_underscores_like_toml() -> None:
    assert load_config(env={"SPAWNMESH_ACTORS_MAX_QUEUED_PER_NODE": "200_000"}).actors == (
        ActorsConfig(max_queued_per_node=200_000)
    )


# --- the statestore key: alias and secrecy ---------------------------------------------------


def test_spawn_alias_for_statestore_key() -> None:
    assert load_config(env={"SPAWN_STATESTORE_KEY": KEY_A}).statestore.key == KEY_A
    both = {"SPAWN_STATESTORE_KEY": KEY_A, "SPAWNMESH_STATESTORE_KEY": KEY_B}
    assert load_config(env=both).statestore.key == KEY_B  # the primary name wins


def test_secrets_are_redacted_everywhere() -> None:
    cfg = load_config(
        env={
            "SPAWNMESH_STATESTORE_KEY": KEY_A,
            "SPAWNMESH_STATESTORE_URL": "postgresql+psycopg://spawn:hunter2@db:5432/spawn",
        }
    )
    view = redacted(cfg)
    statestore = view["statestore"]
    assert isinstance(statestore, dict)
    assert statestore["key"] == "***"
    assert statestore["url"] == "postgresql+psycopg://spawn:***@db:5432/spawn"
    for text in (json.dumps(view), to_toml(view), repr(cfg), str(cfg)):
        assert KEY_A not in text and "hunter2" not in text
    # An unset secret is shown as empty, not as *** (nothing to hide, and useful to see).
    empty = redacted(load_config(env={}))["statestore"]
    assert isinstance(empty, dict) and empty["key"] == ""


def test_key_grammar_matches_the_statestore() -> None:
    # Rotation: several keys, each 'id:base64' or bare (standard or URL-safe alphabet).
    urlsafe = base64.urlsafe_b64encode(bytes(range(200, 232))).decode()
    keys = f"old:{KEY_A}, {urlsafe}"
    assert load_config(env={"SPAWNMESH_STATESTORE_KEY": keys}).statestore.key == keys
    err = error_of(env={"SPAWNMESH_STATESTORE_KEY": f"bad id!:{KEY_A}"})
    assert err.setting == "statestore.key" and KEY_A not in str(err)


def test_bad_secret_is_not_echoed_in_the_error() -> None:
    err = error_of(env={"SPAWNMESH_STATESTORE_KEY": "c2VjcmV0LXNob3J0"})
    assert err.setting == "statestore.key"
    assert "c2VjcmV0LXNob3J0" not in str(err) and "32 random bytes" in str(err)
    err = error_of(env={"SPAWN_STATESTORE_KEY": "not base64!"})
    assert "not base64!" not in str(err) and "SPAWN_STATESTORE_KEY" in str(err)


def test_show_output_round_trips_as_a_config_file(tmp_path: Path) -> None:
    cfg = load_config(env={"SPAWNMESH_OPS_PORT": "1234", "SPAWNMESH_NAME": "n1"})
    path = write_toml(tmp_path, to_toml(redacted(cfg)))
    assert tomllib.loads(path.read_text())["ops"]["port"] == 1234
    assert load_config(env={}, file=path) == cfg


# --- bad values: one ConfigError naming the setting, what is allowed and where from ----------


def test_error_message_shape() -> None:
    err = error_of(env={"SPAWNMESH_OPS_PORT": "abc"})
    assert err.setting == "ops.port"
    assert str(err) == (
        "ops.port: must be an integer in 0..65535, got 'abc' (from SPAWNMESH_OPS_PORT)"
    )
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("env", "setting", "allowed"),
    [
        ({"SPAWNMESH_OPS_PORT": "nine"}, "ops.port", "integer"),
        ({"SPAWNMESH_OPS_PORT": "1.5"}, "ops.port", "integer"),
        ({"SPAWNMESH_OPS_PORT": "65536"}, "ops.port", "0..65535"),
        ({"SPAWNMESH_OPS_PORT": "-1"}, "ops.port", "0..65535"),
        ({"SPAWNMESH_ACTORS_DEFAULT_TIMEOUT_MS": "0"}, "actors.default_timeout_ms", "1..3600000"),
        ({"SPAWNMESH_ACTORS_MAX_QUEUE_PER_ACTOR": "1000001"}, "actors.max_queue_per_actor", ".."),
        ({"SPAWNMESH_LOG_FORMAT": "xml"}, "log.format", "one of human, json"),
        ({"SPAWNMESH_LOG_LEVEL": "trace"}, "log.level", "one of debug, info, warning, error"),
        ({"SPAWNMESH_STATESTORE_ALLOW_PLAINTEXT": "maybe"}, "statestore.allow_plaintext", "bool"),
        ({"SPAWNMESH_STATESTORE_POOL_SIZE": ""}, "statestore.pool_size", "integer"),
        ({"SPAWNMESH_APP": "no_colon"}, "app", "module:attribute"),
        ({"SPAWNMESH_OPS_HOST": ""}, "ops.host", "empty"),
    ],
)
def test_bad_env_values(env: dict[str, str], setting: str, allowed: str) -> None:
    err = error_of(env=env)
    assert err.setting == setting
    text = str(err)
    assert text.startswith(f"{setting}: ") and allowed in text
    assert f"(from {next(iter(env))})" in text


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ('[ops]\nport = "abc"\n', "ops.port"),
        ("[ops]\nport = 70000\n", "ops.port"),
        ("[ops]\nport = true\n", "ops.port"),
        ("[ops]\nport = 1.5\n", "ops.port"),
        ('[log]\nformat = "xml"\n', "log.format"),
        ('[statestore]\nallow_plaintext = "sometimes"\n', "statestore.allow_plaintext"),
        ("name = 5\n", "name"),
        ("[ops]\nprot = 9091\n", "ops.prot"),  # unknown key in a known section
        ("[opps]\nport = 9091\n", "opps"),  # unknown section
        ("bogus = 1\n", "bogus"),  # unknown top-level key
        ("ops = 3\n", "ops"),  # a section given as a value
        ("[ops.port]\nx = 1\n", "ops.port"),  # a value given as a section
    ],
)
def test_bad_file_values(tmp_path: Path, toml: str, setting: str) -> None:
    path = write_toml(tmp_path, toml)
    err = error_of(env={}, file=path)
    assert err.setting.startswith(setting)
    assert str(path) in str(err)


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    err = error_of(env={}, file=tmp_path / "missing.toml")
    assert err.setting == "config" and "missing.toml" in str(err)
    err = error_of(env={"SPAWNMESH_CONFIG": str(tmp_path / "gone.toml")})
    assert "SPAWNMESH_CONFIG" in str(err)
    path = write_toml(tmp_path, "[ops\nport = 1\n")
    err = error_of(env={}, file=path)
    assert err.setting == "config" and "not valid TOML" in str(err)


@pytest.mark.parametrize(
    ("overrides", "setting", "needle"),
    [
        ({"ops.prot": 1}, "ops.prot", "unknown setting"),
        ({"nope.port": 1}, "nope.port", "unknown setting"),
        ({"ops": 1}, "ops", "unknown setting"),
        ({"ops.port": "abc"}, "ops.port", "integer"),
        ({"ops.port": True}, "ops.port", "integer"),
        ({"ops.port": 99999}, "ops.port", "0..65535"),
        ({"log.level": "loud"}, "log.level", "one of"),
        ({"statestore.allow_plaintext": "perhaps"}, "statestore.allow_plaintext", "boolean"),
        ({"name": 12}, "name", "string"),
    ],
)
def test_bad_overrides(overrides: dict[str, object], setting: str, needle: str) -> None:
    err = error_of(env={}, overrides=overrides)
    assert err.setting == setting and needle in str(err)
    assert "(from overrides)" in str(err)


def test_override_origins_name_the_flag() -> None:
    err = error_of(env={}, overrides={"ops.port": "x"}, override_origins={"ops.port": "--ops-port"})
    assert str(err).endswith("(from --ops-port)")


def test_bad_env_is_reported_even_when_overridden() -> None:
    # A broken environment is a mistake worth hearing about, even if a flag hides it.
    err = error_of(env={"SPAWNMESH_OPS_PORT": "x"}, overrides={"ops.port": 1})
    assert err.setting == "ops.port"


def test_unknown_env_vars_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "SPAWNMESH_OPS_PROT": "1",
        "SPAWNMESH_NODE": "http://x",  # known, used by the CLI
        "SPAWNMESH_CONFIG": "",  # known, names the file
        "OTHER_THING": "1",  # not ours
    }
    with caplog.at_level(logging.WARNING, logger="spawnmesh.config"):
        cfg = load_config(env=env)
    assert cfg == NodeConfig()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "SPAWNMESH_OPS_PROT" in warned[0]


# --- property: ints round-trip through env strings; out-of-range ints are rejected -----------

INT_SETTINGS = [s for s in settings() if s.type == "int"]


def _env_var(doc: SettingDoc) -> str:
    return doc.env[0]


def _value_at(cfg: NodeConfig, dotted: str) -> object:
    value: object = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@given(data=st.data())
def test_any_in_range_int_round_trips_through_env(data: st.DataObject) -> None:
    doc = data.draw(st.sampled_from(INT_SETTINGS))
    assert doc.min is not None and doc.max is not None
    value = data.draw(st.integers(min_value=int(doc.min), max_value=int(doc.max)))
    cfg = load_config(env={_env_var(doc): str(value)})
    assert _value_at(cfg, doc.name) == value
    assert load_config(env={}, overrides={doc.name: str(value)}) == cfg


@given(data=st.data())
def test_any_out_of_range_int_is_rejected(data: st.DataObject) -> None:
    doc = data.draw(st.sampled_from(INT_SETTINGS))
    assert doc.min is not None and doc.max is not None
    value = data.draw(
        st.integers(max_value=int(doc.min) - 1) | st.integers(min_value=int(doc.max) + 1)
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={_env_var(doc): str(value)})
    assert info.value.setting == doc.name and _env_var(doc) in str(info.value)


# --- the settings table and the generated docs ------------------------------------------------


def test_every_setting_is_documented_and_bounded() -> None:
    docs = settings()
    names = [d.name for d in docs]
    assert len(names) == len(set(names))
    assert {"ops.port", "actors.default_timeout_ms", "statestore.key", "log.format"} <= set(names)
    for doc in docs:
        assert len(doc.help) > 20, doc.name
        assert doc.env[0] == "SPAWNMESH_" + doc.name.replace(".", "_").upper()
        if doc.type == "int":
            assert doc.min is not None and doc.max is not None, doc.name
        if doc.unit:
            assert doc.name.endswith("_" + doc.unit), doc.name
        if doc.name.endswith("_ms"):
            assert doc.unit == "ms" and "millisecond" in doc.help, doc.name
    key = next(d for d in docs if d.name == "statestore.key")
    assert key.secret and key.env == ("SPAWNMESH_STATESTORE_KEY", "SPAWN_STATESTORE_KEY")


@dataclasses.dataclass(frozen=True, slots=True)
class _TunablesSection:
    """A section written like cluster tunables: plain defaults with attribute docstrings."""

    probe_interval_ms: int = 1_000
    """Time between two probes of one member in milliseconds."""

    seeds: tuple[str, ...] = ()
    """Addresses of members to join at start-up."""


@dataclasses.dataclass(frozen=True)
class _PeerSection:
    """A section written with setting(...), itself holding a nested section."""

    max_frame_bytes: int = setting(1 << 20, "Largest peer frame in bytes.", min=1, max=1 << 30)
    tls: bool = setting(False, "Whether peer links use TLS (a boolean).")
    membership: _TunablesSection = dataclasses.field(default_factory=_TunablesSection)


@dataclasses.dataclass(frozen=True)
class _FutureNodeConfig:
    """NodeConfig as later issues will extend it: the existing sections plus new ones."""

    name: str = setting("", "Node id (a string).")
    ops: OpsConfig = dataclasses.field(default_factory=OpsConfig)
    peer: _PeerSection = dataclasses.field(default_factory=_PeerSection)


def test_a_new_section_is_picked_up_from_the_dataclass_alone(tmp_path: Path) -> None:
    # Later issues add sections (membership, peer, host) by adding a field to NodeConfig: the
    # loader walks the dataclasses, so nothing else has to change, at any nesting depth.
    path = write_toml(tmp_path, "[peer]\ntls = true\n[peer.membership]\nprobe_interval_ms = 7\n")
    env = {
        "SPAWNMESH_PEER_MAX_FRAME_BYTES": "4096",
        "SPAWNMESH_PEER_MEMBERSHIP_SEEDS": "10.0.0.1:7946, 10.0.0.2:7946",
    }
    cfg = config_module._load(_FutureNodeConfig, {"ops.port": 1}, env, path, None)
    assert cfg.ops.port == 1
    assert cfg.peer.tls is True and cfg.peer.max_frame_bytes == 4096
    assert cfg.peer.membership.probe_interval_ms == 7
    assert cfg.peer.membership.seeds == ("10.0.0.1:7946", "10.0.0.2:7946")
    leaves = config_module._leaves(_FutureNodeConfig)
    assert leaves["peer.membership.probe_interval_ms"].doc.help.startswith("Time between")
    assert leaves["peer.max_frame_bytes"].doc.unit == "bytes"
    with pytest.raises(ConfigError) as info:
        config_module._load(_FutureNodeConfig, {"peer.membership.prob": 1}, {}, None, None)
    assert info.value.setting == "peer.membership.prob"
    # and the real NodeConfig is walked the same way
    fields = {f.name for f in dataclasses.fields(NodeConfig)}
    assert fields == {d.name.split(".")[0] for d in settings()}


def test_docs_file_is_generated_from_the_code() -> None:
    text = render_docs_markdown()
    for doc in settings():
        assert f"### `{doc.name}`" in text and doc.env[0] in text
    on_disk = (ROOT / "docs" / "configuration.md").read_text()
    assert on_disk == text, "docs/configuration.md is stale: run `spawnmesh config docs`"
