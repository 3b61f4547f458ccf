"""Shared pytest fixtures. Keep this file thin: fixtures live in their own modules."""

import os

import pytest

from tests.s3server import s3_server  # noqa: F401  (session-scoped S3 server on 127.0.0.1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a busy 2-core machine, 2 threads contend and many-small-op
    networks (MTCNN, tiny UNets, metric nets) run several times slower. Use via pytestmark."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def ray_local(s3_server):  # noqa: F811  (the fixture imported above)
    """A real local Ray for one test module; workers get the S3 test server's credentials via env vars."""
    import ray

    from tasks.pipeline import ROOT

    env = dict(s3_server.env)
    env["PYTHONPATH"] = str(ROOT)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the driver reads S3 the same usual way
    # address="local": always a fresh Ray, even while another on this machine (ray start --head) is up.
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
