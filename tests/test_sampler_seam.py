"""The sampler seam of the online loop: one attribute an inference engine's client can replace."""

from conftest import assert_params_close, final_params, online_config
from tether.sampling import sample_responses
from tether.train.online import OnlineRun, online_train


def test_online_samples_only_through_its_sampler_attribute(model_dir, prompt_file, tmp_path):  # noqa: F811
    kw = dict(steps=2, phases=2, lora=True, lora_r=4, lora_alpha=8)
    calls = []

    def engine(model, prompts, seeds, **options):  # stands in for an engine client: same arguments, same result
        calls.append(len(prompts))
        return sample_responses(model, prompts, seeds, **options)

    run = OnlineRun(online_config(model_dir, prompt_file, tmp_path / "seam", **kw), resume=False)
    assert run.sample is sample_responses
    run.sample = engine
    run.run()
    assert calls == [4, 4]  # every step's prompts, and nothing sampled elsewhere
    plain = online_train(online_config(model_dir, prompt_file, tmp_path / "plain", **kw))
    assert_params_close(final_params(tmp_path / "seam"), final_params(plain), atol=0)
