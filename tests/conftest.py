import os

from hypothesis import HealthCheck, settings

# Every engine the suite builds, here or in a child process, verifies before each model call
# that each KV slot it reads holds its own token at its own position (kv_check.py).
os.environ.setdefault("PAGEDKV_CHECK_KV", "1")

# CI runs more examples of the property-based tests than a quick local run.
settings.register_profile("ci", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory for tiny random Llama folders, built once per set of arguments."""
    from models import make_tiny_llama

    built: dict[tuple, str] = {}

    def make(**kwargs) -> str:
        key = repr(sorted(kwargs.items()))  # values may be dicts (extra_config)
        if key not in built:
            built[key] = make_tiny_llama(str(tmp_path_factory.mktemp("tiny")), **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="module")
def model_path(tiny_model):
    """A module's tiny model (a module that needs another shape defines its own)."""
    return tiny_model(num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def loaded(model_path):
    """The module's model, loaded once."""
    from pagedkv.runtime.models.loader import load_model

    return load_model(model_path)


@pytest.fixture(scope="module")
def api(url):
    """The openai client on a module's gateway (`url`)."""
    import openai

    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(api):
    """The name the module's gateway serves its model under."""
    return api.models.list().data[0].id


@pytest.fixture(scope="module")
def offline(model_path):
    """The module's model run offline, the reference for what its server returns."""
    from pagedkv import LLM

    return LLM(model=model_path, num_device_blocks=512, block_size=4)


@pytest.fixture
def always_load(monkeypatch):
    """The cost model never cuts a load from a tier below the device. A tiny model recomputes a
    block faster than any tier reads it, so it would learn to recompute; the tests that check what
    the tiers serve need the blocks read (the cost model's own choice is tested apart)."""
    from pagedkv.preemption.policy import PreemptionPolicy

    monkeypatch.setattr(PreemptionPolicy, "should_load", lambda self, tier, num_blocks, block_size: True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: threads only add synchronisation, which stalls on a busy machine. One
    count for a whole module also keeps both sides of a comparison's floats identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
