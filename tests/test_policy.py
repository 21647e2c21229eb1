"""The policy interface and FixedPolicy (pure: no process group)."""

import pytest

from lightning_netsense import Decision, FixedPolicy, Policy
from lightning_netsense.codecs import CODECS


def test_fixed_policy_always_returns_its_decision():
    policy = FixedPolicy(mode="fp16")
    assert policy.decide(None) == Decision("fp16")
    assert policy.candidates() == (Decision("fp16"),)
    assert FixedPolicy().decide(None) == Decision("none")


def test_unknown_mode_names_the_argument_and_accepted_values():
    with pytest.raises(ValueError, match=r"`mode`.*'bf16'.*'fp16'") as info:
        FixedPolicy(mode="fp8")
    assert "fp8" in str(info.value)


def test_option_of_another_mode_is_refused():
    with pytest.raises(ValueError, match="`density` does not apply to mode 'fp16'"):
        FixedPolicy(mode="fp16", density=0.1)


@pytest.mark.skipif("topk" not in CODECS, reason="top-k codec not registered")
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_topk_density_out_of_range(density):
    with pytest.raises(ValueError, match="density"):
        FixedPolicy(mode="topk", density=density)


def test_policy_base_requires_decide():
    with pytest.raises(TypeError):
        Policy()

    class Always(Policy):
        def decide(self, observation):
            return Decision("bf16")

    assert Always().decide(None).mode == "bf16"
    assert Always().state_dict() == {}
