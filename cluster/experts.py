"""Client API of the elastic expert runtime of a served application (the CLI and the admin
dashboard use it). The caller connects Ray first (`ray.init(address=...)`).

Every replica of the model deployment is one sharded copy with its own router, placement and
controller. `experts_status` answers with the first replica's view at the top level and every
replica's under "replicas"; actions run on every replica (each gets its own event) and return
the first replica's event with all of them under "replicas". Serve routes a handle call to any
replica, so a call is repeated (bounded) until each running replica has answered once.

Keys (stable; changes are written in docs/design-notes-8.md):
  experts_status -> {"placement": [layer][shard] -> expert ids (a replicated expert is on several
                     shards), "load": [layer][expert] tokens in the sliding window, "shard_load":
                     [shard] window tokens (a replicated expert's tokens split among its copies),
                     "imbalance": max/mean shard load (float, 1.0 = even), "shards": [{"index",
                     "node_id", "alive", "n_experts", "experts_per_layer", "bundle"}], "standby":
                     [{"node_id", "bundle", "pid"}] (shards started without experts), "events":
                     [{"time", "action", "before", "after", "duration_s", "ok", "message"}],
                     "controller": {"enabled", "threshold", ... ElasticConfig fields, "last_check"},
                     "router_node_id", "generation", "failure", "replica", "replicas"}
  rebalance / apply_placement / scale_shards / drain_node -> the event dict, plus "replica" and
                     "replicas" ({replica id: event}).
"""

from __future__ import annotations

from ray import serve

MODEL_DEPLOYMENT = "MoEModel"


class ExpertsError(ValueError):
    """No such application, or no running replica to ask."""


def _running_replicas(app: str) -> int:
    apps = serve.status().applications
    if app not in apps:
        raise ExpertsError(f"no Serve application {app!r}; running: {', '.join(apps) or 'none'}")
    deployment = apps[app].deployments.get(MODEL_DEPLOYMENT)
    if deployment is None:
        raise ExpertsError(f"application {app!r} has no {MODEL_DEPLOYMENT} deployment")
    running = sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))
    if not running:
        raise ExpertsError(f"application {app!r} has no running {MODEL_DEPLOYMENT} replica")
    return running


def _each_replica(app: str, action: str, *args) -> list[dict]:
    """[{"replica", "result"}] from every running replica (bounded tries: Serve picks replicas)."""
    n = _running_replicas(app)
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=app)
    answers: dict[str, object] = {}
    for _ in range(10 * n):
        reply = handle.admin.remote(action, list(args), list(answers)).result()
        if reply is not None:
            answers[reply["replica"]] = reply["result"]
        if len(answers) == n:
            break
    return [{"replica": r, "result": result} for r, result in answers.items()]


def _first_with_all(answers: list[dict]) -> dict:
    first = dict(answers[0]["result"])
    first["replica"] = answers[0]["replica"]
    first["replicas"] = {a["replica"]: a["result"] for a in answers}
    return first


def experts_status(app: str = "moray") -> dict:
    """Placement, load, imbalance, shards, recent events and controller settings (see module doc)."""
    return _first_with_all(_each_replica(app, "elastic_status"))


def rebalance(app: str = "moray") -> dict:
    """Re-place experts by the recent load (replicating hot experts if the config allows)."""
    return _first_with_all(_each_replica(app, "rebalance"))


def apply_placement(app: str, placement_lists: list) -> dict:
    """An explicit placement: [layer][shard] -> expert ids, or one [shard] -> ids for all layers."""
    return _first_with_all(_each_replica(app, "apply_placement", placement_lists))


def scale_shards(app: str, n: int) -> dict:
    """n expert shards per replica, experts re-placed by load; new shards go to other nodes."""
    return _first_with_all(_each_replica(app, "scale_shards", int(n)))


def drain_node(app: str, node_id: str) -> dict:
    """Move every shard on that node to other nodes (the same experts)."""
    return _first_with_all(_each_replica(app, "drain_node", node_id))
