"""The supervision files in deploy/ are well formed and do what deploy/README.md says."""

from __future__ import annotations

import configparser
import plistlib

from processes import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def test_launchd_plists_keep_the_processes_alive():
    plists = {p.name: plistlib.loads(p.read_bytes()) for p in (DEPLOY / "launchd").glob("*.plist")}
    assert set(plists) == {"com.mlx-gateway.gateway.plist", "com.mlx-gateway.worker-smollm2.plist"}
    for name, plist in plists.items():
        assert plist["Label"] + ".plist" == name
        assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
        assert plist["ProgramArguments"][0].endswith(("/gateway", "/worker"))
    gateway = plists["com.mlx-gateway.gateway.plist"]["ProgramArguments"]
    assert gateway[gateway.index("--models") + 1] == "/opt/mlx-gateway/deploy/models.toml"
    worker = plists["com.mlx-gateway.worker-smollm2.plist"]  # a model kept loaded outside the list
    assert worker["ExitTimeOut"] > 30, "longer than the worker's drain timeout"
    assert worker["ProgramArguments"][1:3] == ["--model", "smollm2-135m"]


def test_systemd_units_restart_and_drain():
    for name, stop_seconds in (("mlx-gateway.service", 40), ("mlx-gateway-worker@.service", 30)):
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.read(DEPLOY / "systemd" / name)
        service = unit["Service"]
        assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
        assert int(service["TimeoutStopSec"]) > stop_seconds
        assert service["ExecStart"].startswith("/opt/mlx-gateway/.venv/bin/")
    gateway = configparser.ConfigParser(interpolation=None, strict=False)
    gateway.read(DEPLOY / "systemd" / "mlx-gateway.service")
    assert "--models /opt/mlx-gateway/deploy/models.toml" in gateway["Service"]["ExecStart"]
    assert gateway["Service"]["KillMode"] == "mixed", "SIGTERM to the gateway alone: it stops its workers in order"


def test_the_shipped_model_list_serves_the_default_model():
    from gateway.models.catalog import load_catalog

    catalog = load_catalog(DEPLOY / "models.toml")
    assert [(m.name, m.model) for m in catalog] == [("smollm2-135m", "smollm2-135m")]
