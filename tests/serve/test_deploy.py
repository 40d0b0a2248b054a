"""The deployment files, checked as data (Docker and a cluster are not available to the tests):
at least two gateway replicas, all on one PostgreSQL store and one Redis; configs that load."""

from __future__ import annotations

import re

import yaml

from llmtune.serve.config import ServeConfig
from tests.conftest import REPO

SERVE = REPO / "serve"


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((SERVE / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_example_configs_load():
    ServeConfig.model_validate(yaml.safe_load((SERVE / "gateway.example.yaml").read_text()))
    cm = k8s_objects()[("ConfigMap", "llmtune-gateway")]
    cfg = ServeConfig.model_validate(yaml.safe_load(cm["data"]["gateway.yaml"]))
    assert cfg.audit_retention_days > 0


def test_compose_runs_two_gateway_replicas_on_shared_postgres_and_redis():
    compose = yaml.safe_load((SERVE / "docker-compose.yml").read_text())
    services = compose["services"]
    gateways = {name: s for name, s in services.items() if s.get("command", [None])[0] == "serve"}
    assert len(gateways) >= 2
    for s in gateways.values():
        env = s["environment"]
        assert "postgresql://" in env["LLMTUNE_STORE"] and "@postgres:5432/" in env["LLMTUNE_STORE"]
        assert env["LLMTUNE_RATE_LIMIT_STORAGE"].endswith("redis://redis:6379/0}")
        assert set(s["depends_on"]) == {"postgres", "redis"}
        assert not any("keys.json" in v for v in s.get("volumes", []))
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in gateways.values()]
    assert len({tuple(g) for g in gpus}) == len(gpus)  # one GPU each, no two on the same one
    assert services["postgres"]["image"].startswith("postgres:") and services["redis"]["image"].startswith("redis:")
    # The published port is the proxy's, and it balances over every replica.
    assert [s for s in services.values() if s.get("ports")] == [services["proxy"]]
    upstreams = set(re.findall(r"server (\S+):8000", (SERVE / "nginx.conf").read_text()))
    assert upstreams == set(gateways)


def test_kubernetes_runs_two_replicas_sharing_state_and_purges_daily():
    objects = k8s_objects()
    deployment = objects[("Deployment", "llmtune")]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["LLMTUNE_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "llmtune-store", "key": "url"}
    redis_host = re.match(r"redis://([^:/]+):6379", env["LLMTUNE_RATE_LIMIT_STORAGE"]["value"]).group(1)
    assert ("Service", redis_host) in objects and ("Service", "llmtune-postgres") in objects
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # vLLM stays per pod
    assert not any("secret" in v and v["secret"].get("secretName") == "llmtune-keys" for v in pod["volumes"])
    selectors = {o["spec"]["selector"].get("app") for (kind, _), o in objects.items() if kind == "Service"}
    labels = {o["spec"]["template"]["metadata"]["labels"]["app"] for (kind, _), o in objects.items()
              if kind in ("Deployment", "StatefulSet")}
    assert selectors <= labels  # every Service selects pods that something runs
    purge = objects[("CronJob", "llmtune-audit-purge")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert purge["containers"][0]["args"][:2] == ["audit", "purge"]
