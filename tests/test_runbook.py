"""The operations pages stay true to the code: every node.toml key, status field and metric is in them.

The node.toml table of docs/operations/configuration.md must be exactly what
``python -m tools.config_doc`` generates from engine.cluster.config.DEFAULT_TOML;
status fields (docs/operations/status-and-metrics.md) are taken from the
objects that produce ``walctl status`` (a node, its cluster side as master
and as replica, the master's per-replica rows, a replica's link); metric
names from the registry engine/metrics.py builds; the Postfix settings of
docs/operations/postfix.md are the ones tests/e2e/test_postfix.py runs.
"""

from __future__ import annotations

import os
import re

from engine.cluster import Cluster, ClusterConfig
from engine.cluster.config import DEFAULTS
from engine.cluster.metrics import Metrics
from engine.node import Node
from engine.replication.receiver import ReplicaLink
from engine.replication.sender import ReplicaStatus
from tools.cmd_cluster import _offline_status
from tools.config_doc import markdown_table, settings
from tests.support import ROOT


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _operations(page: str) -> str:
    with open(os.path.join(ROOT, "docs", "operations", page), encoding="utf-8") as f:
        return f.read()


def _documented(name: str, page: str = "status-and-metrics.md") -> bool:
    text = _operations(page)
    return f"`{name}`" in text or re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", text) is not None


def test_readme_opens_with_make_demo_and_make_test():
    first_block = re.search(r"```\n(.*?)```", _readme(), re.S)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_links_the_runbook_and_the_runbook_links_its_references():
    assert "(docs/operations/runbook.md)" in _readme()
    runbook = _operations("runbook.md")
    for page in ("configuration.md", "status-and-metrics.md", "systemd.md", "postfix.md"):
        assert f"]({page}" in runbook, page


def test_node_toml_table_is_the_generated_one():
    assert markdown_table() in _operations("configuration.md"), "regenerate it: python -m tools.config_doc"
    assert len(settings()) == sum(len(v) for v in DEFAULTS.values())


def test_every_status_field_is_documented(tmp_path):
    path = str(tmp_path / "node1")
    node = Node.init(path, name="node1")
    try:
        fields = set(node.status())
        for role in ("master", "replica"):  # what a running node adds, per role
            cluster = Cluster(ClusterConfig(name="node1"))
            cluster.node = node
            node.config.role = role
            fields |= set(cluster.status())
    finally:
        node.close()
    fields |= set(_offline_status(path))  # a stopped node
    fields |= set(ReplicaStatus.__dataclass_fields__)  # a master's row per replica...
    fields |= {"durable_lag_records", "durable_lag_seconds", "applied_lag_records"}  # ...and what status adds to it
    fields |= set(ReplicaLink("node2", "127.0.0.1:7001").as_dict())  # a replica's connection
    missing = sorted(f for f in fields if not _documented(f))
    assert not missing, f"status fields missing from docs/operations/status-and-metrics.md: {missing}"


def test_every_metric_is_documented():
    names = []
    for family in Metrics().registry.collect():
        names.append(family.name + ("_total" if family.type == "counter" else ""))
    assert len(names) >= 10
    missing = [n for n in names if not _documented(n)]
    assert not missing, f"metrics missing from docs/operations/status-and-metrics.md: {missing}"


def test_postfix_settings_are_the_tested_ones():
    with open(os.path.join(ROOT, "tests", "e2e", "test_postfix.py"), encoding="utf-8") as f:
        tested = f.read()
    page = _operations("postfix.md")
    for setting in ("virtual_transport", "virtual_mailbox_domains", "local_transport", "local_recipient_maps",
                    "mailbox_transport", "mydestination"):
        assert f'"{setting}"' in tested, setting
        assert re.search(rf"^{setting} =", page, re.M), setting
