"""Settings: embedded default, YAML file, DICOMNODE_* environment, clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dicomnode.config import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_matches_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CONFIG", "AE_TITLE", "PORT", "DATA_DIR", "DATABASE_URL"):
        monkeypatch.delenv(f"DICOMNODE_{key}", raising=False)
    default = load_settings()
    from_file = load_settings(ROOT / "config" / "node.yaml")
    a, b = default.model_dump(), from_file.model_dump()
    url_a, url_b = a.pop("database_url"), b.pop("database_url")
    assert a == b
    assert Path(url_a.split("///")[1]).resolve() == Path(url_b.split("///")[1]).resolve()
    assert (default.ae_title, default.port, default.data_dir) == ("DICOMNODE", 11112, Path("var"))


def test_production_example_is_valid() -> None:
    s = load_settings(ROOT / "config" / "production.yaml")
    assert s.allowed_calling_aets and s.db_url.startswith("postgresql")


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_DATABASE_URL", raising=False)  # the PostgreSQL pass sets it
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"ae_title": "FROMFILE", "port": 104,
                                   "peers": {"ORTHANC": {"host": "127.0.0.1", "port": 4242}}}))
    monkeypatch.setenv("DICOMNODE_CONFIG", str(cfg))
    monkeypatch.setenv("DICOMNODE_PORT", "11113")
    monkeypatch.setenv("DICOMNODE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("DICOMNODE_COMPLETION__QUIET_PERIOD_S", "3")
    s = load_settings()
    assert (s.ae_title, s.port, s.completion.quiet_period_s) == ("FROMFILE", 11113, 3)
    assert s.peers["ORTHANC"].port == 4242
    assert s.db_url == f"sqlite:///{tmp_path / 'd' / 'dicomnode.db'}"
    monkeypatch.setenv("DICOMNODE_AE_TITLE", "ENVAE")
    monkeypatch.setenv("DICOMNODE_DATABASE_URL", "sqlite:///x.db")
    s = load_settings()
    assert (s.ae_title, s.db_url) == ("ENVAE", "sqlite:///x.db")


def test_urgent_lane_is_on_by_default_and_can_be_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(None)
    assert (s.workers, s.urgent_workers) == (1, 1)
    monkeypatch.setenv("DICOMNODE_URGENT_WORKERS", "0")
    assert load_settings(None).urgent_workers == 0


@pytest.mark.parametrize("bad", [{"ae_title": "WAY_TOO_LONG_AE_TITLE"}, {"port": 70000},
                                 {"unknown_key": 1}, {"ae_title": "BACK\\SLASH"},
                                 {"max_associations_per_ip": 0}, {"association_timeout_s": 0},
                                 {"max_pdu": 0}, {"max_pdu": 2**30}, {"urgent_workers": -1}])
def test_invalid_values_are_named(tmp_path: Path, bad: dict[str, object]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=next(iter(bad))):
        load_settings(cfg)


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_settings(tmp_path / "none.yaml")
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(cfg)


def _pem_files(folder: Path) -> dict[str, str]:
    """Paths for the TLS settings (existence is what the settings check; tls.py loads)."""
    names = {"certificate": "node.pem", "private_key": "node.key", "ca_certificates": "ca.pem"}
    for name in names.values():
        (folder / name).write_text("-----BEGIN CERTIFICATE-----\n")
    return {key: str(folder / name) for key, name in names.items()}


def test_tls_listener_settings_with_either_spelling_of_require_client_cert(
        tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    for key in ("require_client_certificate", "require_client_cert"):
        cfg = tmp_path / f"{key}.yaml"
        cfg.write_text(yaml.safe_dump({"port": None, "tls": {**files, key: True}}))
        s = load_settings(cfg)
        assert s.port is None and s.tls is not None
        assert (s.tls.port, s.tls.require_client_certificate) == (2762, True)
    s = load_settings(None, peers={"PACS": {"host": "pacs", "port": 2762, "tls": {
        "ca_certificates": files["ca_certificates"]}}})
    assert s.peers["PACS"].tls is not None and s.peers["PACS"].tls.check_hostname


def _listener(files: dict[str, str], **changes: object) -> dict[str, object]:
    return {"tls": {"certificate": files["certificate"], "private_key": files["private_key"],
                    **changes}}


_BAD_TLS: dict[str, Callable[[dict[str, str]], dict[str, object]]] = {
    "port": lambda f: {"port": None},
    "tls.certificate": lambda f: _listener(f, certificate=f["certificate"] + ".missing"),
    "tls.require_client_certificate": lambda f: _listener(f, require_client_certificate=True),
    "tls.port": lambda f: {"port": 2762, **_listener(f)},
    "unknown": lambda f: _listener(f, unknown=1),
    "tls.private_key": lambda f: {"peers": {"PACS": {"host": "pacs", "port": 104, "tls": {
        "certificate": f["certificate"]}}}},
}


@pytest.mark.parametrize("named", sorted(_BAD_TLS))
def test_invalid_tls_settings_are_named(tmp_path: Path, named: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_BAD_TLS[named](_pem_files(tmp_path))))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_settings(cfg)


def test_executor_celery_needs_a_broker_and_threads_stay_the_default() -> None:
    assert load_settings(None).executor == "threads"
    with pytest.raises(ValueError, match="'broker_url' value 'None'"):
        load_settings(None, executor="celery")
    with pytest.raises(ValueError, match="executor"):
        load_settings(None, executor="kubernetes")
    s = load_settings(None, executor="celery", broker_url="amqp://u:p@mq:5672/dicomnode")
    assert (s.celery.queue, s.celery.urgent_queue) == ("jobs", "urgent")


def test_radiomics_is_off_by_default_and_on_for_the_pipelines_named(tmp_path: Path) -> None:
    assert load_settings().radiomics.for_pipeline("liver_tumor") is None
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"radiomics": {
        "enabled": True, "pipelines": ["liver_tumor"], "bin_width_hu": 10,
        "resample_mm": None, "families": ["morphology", "glcm"]}}))
    radiomics = load_settings(cfg).radiomics
    parameters = radiomics.for_pipeline("liver_tumor")
    assert parameters.bin_width_hu == 10 and parameters.resample_mm is None
    assert parameters.families == ("morphology", "glcm")
    assert radiomics.for_pipeline("headneck_oar") is None


@pytest.mark.parametrize(("bad", "named"), [
    ({"families": ["texture"]}, "families"),
    ({"bin_width_hu": 0}, "bin_width_hu"),
    ({"aggregation": "2d"}, "aggregation"),
    ({"bins": 32}, "bins"),
])
def test_bad_radiomics_settings_are_named(tmp_path: Path, bad: dict[str, object],
                                          named: str) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"radiomics": bad}))
    with pytest.raises(ValueError, match=named):
        load_settings(cfg)


def test_the_burned_in_series_is_off_by_default_and_turned_on_in_yaml(tmp_path: Path) -> None:
    assert load_settings(None).results.burned_in_series is False
    path = tmp_path / "node.yaml"
    path.write_text("results: {burned_in_series: true}\n")
    assert load_settings(path).results.burned_in_series is True
