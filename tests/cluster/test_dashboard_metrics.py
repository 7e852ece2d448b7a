"""The dashboard's reading of Ray's Prometheus pages: totals per deployment, node gauges, and
latency percentiles from histogram buckets (the same arithmetic as Prometheus'
histogram_quantile), checked on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from cluster.dashboard.prometheus import parse, quantile

PAGE = """# TYPE ray_serve_deployment_request_counter_total counter
ray_serve_deployment_request_counter_total{application="moray",deployment="MoEModel",replica="a"} 7.0
ray_serve_deployment_request_counter_total{application="moray",deployment="MoEModel",replica="b"} 3.0
# TYPE ray_serve_deployment_processing_latency_ms histogram
ray_serve_deployment_processing_latency_ms_bucket{application="moray",deployment="MoEModel",replica="a",le="10.0"} 2.0
ray_serve_deployment_processing_latency_ms_bucket{application="moray",deployment="MoEModel",replica="a",le="100.0"} 7.0
ray_serve_deployment_processing_latency_ms_bucket{application="moray",deployment="MoEModel",replica="a",le="+Inf"} 7.0
ray_serve_deployment_processing_latency_ms_count{application="moray",deployment="MoEModel",replica="a"} 7.0
ray_serve_deployment_processing_latency_ms_sum{application="moray",deployment="MoEModel",replica="a"} 300.0
# TYPE ray_moray_generated_tokens_total counter
ray_moray_generated_tokens_total{application="moray",deployment="MoEModel",replica="a"} 96.0
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="10.0.0.1"} 42.5
# TYPE ray_node_gpus_utilization gauge
ray_node_gpus_utilization{ip="10.0.0.1",GpuIndex="0"} 30.0
ray_node_gpus_utilization{ip="10.0.0.1",GpuIndex="1"} 50.0
"""


def test_parse_sums_replicas_per_deployment_and_reads_node_gauges():
    node, serve = parse(PAGE)
    totals = serve[("moray", "MoEModel")]
    assert (totals.requests, totals.errors, totals.tokens) == (10.0, 0.0, 96.0)
    assert dict(totals.latency_buckets) == {10.0: 2.0, 100.0: 7.0, math.inf: 7.0}
    assert node["cpu_percent"] == 42.5 and node["gpu_percent"] == 80.0  # summed over the node's GPUs


@pytest.mark.parametrize("q, expected", [(0.5, 10.0 + 90.0 * (5.0 - 2.0) / 8.0), (0.1, 5.0), (0.2, 10.0), (1.0, 100.0)])
def test_quantile_interpolates_inside_the_bucket(q, expected):
    buckets = {10.0: 2.0, 100.0: 10.0, math.inf: 10.0}  # cumulative counts, as Prometheus keeps them
    assert quantile(q, buckets) == pytest.approx(expected)


def test_quantile_in_the_open_bucket_is_its_lower_bound_and_none_without_observations():
    assert quantile(0.99, {10.0: 1.0, math.inf: 5.0}) == 10.0
    assert quantile(0.5, {10.0: 0.0, math.inf: 0.0}) is None
