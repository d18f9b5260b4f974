"""HealthService from the config: bad [[check]] / [[query_handler]] tables fail naming the check,
`meshd validate-config` checks them, and the metrics it writes. The service in a running runtime
is in tests/integration/test_health_service_runtime.py."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.config import NodeConfig
from meshd.errors import ConfigError
from meshd.health.monitor import HealthMonitor
from meshd.health.service import HealthService
from meshd.health.spec import CheckSpec
from meshd.metrics import Exposition
from tests.metrics_text import family_types, sample


def test_bad_check_config_names_the_check(tmp_path: Any) -> None:
    cfg = NodeConfig(
        name="x", data_dir=str(tmp_path), checks=[{"name": "web", "kind": "http", "url": "ftp://x"}]
    )
    with pytest.raises(ConfigError, match=r"check 'web': key 'url'"):
        HealthService.from_config(cfg)
    cfg = NodeConfig(name="x", data_dir=str(tmp_path), query_handlers=[{"name": "health", "command": "x"}])
    with pytest.raises(ConfigError, match=r"query_handler 'health'"):
        HealthService.from_config(cfg)


def test_validate_config_checks_the_health_tables(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from meshd.cli.meshd import main

    path = tmp_path / "meshd.toml"
    path.write_text(
        'insecure = true\nbind = "127.0.0.1:7788"\n'
        '[[check]]\nname = "db"\ncommand = "true"\ninterval = "soon"\n'
    )
    assert main(["validate-config", "--config", str(path)]) == 2
    assert "check 'db': key 'interval'" in capsys.readouterr().err
    path.write_text(
        'insecure = true\nbind = "127.0.0.1:7788"\n'
        '[[check]]\nname = "db"\ncommand = "true"\ninterval = "5s"\n'
        '[[query_handler]]\nname = "uptime"\ncommand = ["uptime"]\n'
    )
    assert main(["validate-config", "--config", str(path)]) == 0


async def test_collect_metrics_counts_the_checks_by_status(tmp_path: Any) -> None:
    def disk(name: str, threshold: float) -> CheckSpec:
        return CheckSpec(name, "disk", path=str(tmp_path), warning=threshold, critical=threshold)

    monitor = HealthMonitor([disk("free", 0.0), disk("full", 100.0), disk("not-run", 0.0)])
    service = HealthService(monitor, "n1", "s1")
    await monitor.run_check("free")
    await monitor.run_check("full")
    out = Exposition()
    service.collect_metrics(out)
    text = out.render()
    assert family_types(text) == {"meshd_health_checks": "gauge", "meshd_health_checks_hung": "counter"}
    assert sample(text, "meshd_health_checks", status="passing") == 1
    assert sample(text, "meshd_health_checks", status="warning") == 0
    assert sample(text, "meshd_health_checks", status="critical") == 2
    assert sample(text, "meshd_health_checks_hung_total") == 0
