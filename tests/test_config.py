"""Config validation: each kind of bad input stops with one message naming the key."""

import pytest

from fedllm.config import ConfigError, compose, from_yaml, to_yaml


def test_defaults_compose_and_roundtrip():
    cfg = compose([])
    assert cfg.model.name == "smollm2" and cfg.privacy.example.enabled
    again = from_yaml(to_yaml(cfg))
    assert again == cfg


@pytest.mark.parametrize("overrides,key", [
    (["federation.not_a_key=1"], "federation.not_a_key"),
    (["bogus=1"], "bogus"),
    (["federation.rounds=abc"], "federation.rounds"),
    (["train.batch_size=2.5"], "train.batch_size"),
    (["privacy.example.noise_multiplier=-0.5"], "privacy.example.noise_multiplier"),
    (["privacy.delta=1.0"], "privacy.delta"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.example.target_epsilon=-1"], "privacy.example.target_epsilon"),
    (["model.path=/no/such/model"], "model.path"),
    (["model=hf"], "model.path"),
    (["data=jsonl"], "data.path"),
    (["train.local_steps=0"], "train.local_steps"),
    (["federation.clients_per_round=5", "federation.num_clients=3"],
     "federation.clients_per_round"),
    (["federation.sampling=sometimes"], "federation.sampling"),
    (["data.eval_fraction=1.5"], "data.eval_fraction"),
    (["model.lora.r=0"], "model.lora.r"),
    (["privacy.example.target_epsilon=null", "privacy.example.noise_multiplier=null"],
     "privacy.example"),
    (["privacy.user.enabled=true", "privacy.user.noise=distributed",
      "privacy.user.noise_multiplier=1"], "privacy.user.noise"),
    (["privacy.user.enabled=true", "privacy.user.clip_norm=-1"], "privacy.user.clip_norm"),
    (["privacy.user.enabled=true"], "privacy.user"),
    (["secagg.enabled=true"], "secagg.clipping_range"),
    (["secagg.num_shares=3", "secagg.reconstruction_threshold=4"],
     "secagg.reconstruction_threshold"),
    (["privacy.budget=5", "privacy=none"], "privacy.budget"),
    (["model.adapter=ia3"], "model.adapter"),
    (["adapter=prompt_tuning", "model.prompt_tuning.num_virtual_tokens=0"],
     "model.prompt_tuning.num_virtual_tokens"),
    (["adapter=prompt_tuning", "model.prompt_tuning.init=zeros"], "model.prompt_tuning.init"),
    (["adapter=prompt_tuning", "model.prompt_tuning.init=text"], "model.prompt_tuning.init_text"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert key in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_unknown_group_option_lists_choices():
    with pytest.raises(ConfigError, match="tiny"):
        compose(["model=nope"])


def test_from_yaml_rejects_tampered_config():
    text = to_yaml(compose(["model=tiny"])).replace("rounds: 3", "rounds: -3")
    with pytest.raises(ConfigError, match="federation.rounds"):
        from_yaml(text)


def test_adapter_group_selects_prompt_tuning_and_keeps_lora_keys():
    cfg = compose(["model=tiny", "adapter=prompt_tuning", "model.lora.r=2"])
    assert cfg.model.adapter == "prompt_tuning"
    assert cfg.model.prompt_tuning.num_virtual_tokens == 8 and cfg.model.lora.r == 2
    demo = compose([])
    assert demo.model.adapter == "prompt_tuning" and demo.train.lr == 0.1  # the demo's adapter
    lora = compose(["adapter=lora"])
    assert lora.model.adapter == "lora" and lora.train.lr == 2e-3  # each adapter brings its lr
    assert compose(["adapter=lora", "train.lr=1e-4"]).train.lr == 1e-4  # the command line wins
    assert from_yaml(to_yaml(cfg)) == cfg
    with pytest.raises(ConfigError, match="prompt_tuning"):
        compose(["adapter=nope"])


def test_ffa_lora_group_carries_its_measured_settings_and_overrides_win():
    cfg = compose(["model=tiny", "adapter=ffa_lora"])
    lora = cfg.model.lora
    assert (cfg.model.adapter, lora.r, lora.alpha, lora.freeze_a) == ("lora", 1, 2.0, True)
    assert cfg.train.lr == 2e-2 and cfg.privacy.example.max_grad_norm == 0.25
    assert compose(["model=tiny", "adapter=ffa_lora", "privacy.example.max_grad_norm=0.5"]
                   ).privacy.example.max_grad_norm == 0.5
    assert compose(["model=tiny"]).privacy.example.max_grad_norm == 1.0  # other adapters: C=1


# ----------------------------------------------------------------------------- one source of defaults

def _schema_leaves(cls, prefix=""):
    """(dotted key, dataclass field) for every leaf of the schema."""
    import dataclasses

    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
                f.default_factory):
            yield from _schema_leaves(f.default_factory, key + ".")
        else:
            yield key, f


def test_schema_holds_no_values_so_it_cannot_disagree_with_the_yaml_tree():
    from omegaconf import MISSING

    from fedllm.config import FedLLMConfig

    leaves = dict(_schema_leaves(FedLLMConfig))
    assert len(leaves) > 70  # the whole schema was walked
    with_value = [k for k, f in leaves.items() if f.default != MISSING]
    assert with_value == []


def _group_options():
    from fedllm.config import conf_dir

    return [(d.name, f.stem) for d in sorted(conf_dir().iterdir()) if d.is_dir()
            for f in sorted(d.glob("*.yaml"))]


# Keys a group option leaves to the user on purpose (composing without them names the key).
REQUIRED_FROM_USER = {("model", "hf"): {"model.path"}, ("data", "jsonl"): {"data.path"},
                      ("data", "text"): {"data.path"}}


@pytest.mark.parametrize("group,option", _group_options())
def test_yaml_tree_sets_every_schema_key_for_every_group_option(group, option):
    from omegaconf import OmegaConf

    from fedllm.config import FedLLMConfig, compose_tree

    tree = compose_tree([f"{group}={option}"])
    schema_keys = {k for k, _ in _schema_leaves(FedLLMConfig)}
    missing = {k for k in schema_keys if OmegaConf.is_missing(
        OmegaConf.select(tree, k.rsplit(".", 1)[0]), k.rsplit(".", 1)[1])}
    assert missing == REQUIRED_FROM_USER.get((group, option), set())


def test_yaml_tree_values_are_the_demo():
    """The values the README promises, read through compose (i.e. from conf/ only)."""
    cfg = compose([])
    assert (cfg.model.adapter, cfg.train.batch_size, cfg.train.local_steps,
            cfg.train.physical_batch_size, cfg.train.lr, cfg.eval.mode, cfg.federation.rounds) == (
        "prompt_tuning", 64, 2, 16, 0.1, "server", 3)
    assert cfg.privacy.example.target_epsilon == 8.0 and cfg.privacy.delta == 1e-5


@pytest.mark.parametrize("override,allowed", [
    ("model.adapter=ia3", "[lora, prompt_tuning]"),
    ("eval.mode=remote", "[server, clients]"),
    ("strategy.name=fedprox", "[fedavg, fedavgm, fedadam, fedyogi]"),
    ("privacy.accountant=gdp", "[pld, rdp]"),
])
def test_enum_choices_are_rejected_by_omegaconf_in_one_line(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        compose([override])
    message = str(info.value)
    assert message == f"{key}: Invalid value '{value}', expected one of {allowed}"


def test_enum_values_behave_as_plain_strings():
    import json

    cfg = compose(["model=tiny", "adapter=lora"])
    assert cfg.model.name == "tiny" and f"{cfg.model.adapter}" == "lora"
    assert json.dumps({"a": cfg.model.adapter}) == '{"a": "lora"}'
    assert "name: tiny" in to_yaml(cfg)


# ----------------------------------------------------------------------------- old run dirs

def _old_run_config(tmp_path, *missing, overrides=("model=tiny", "federation.rounds=7")):
    """A config.yaml as an older fedllm wrote it: without the keys in ``missing``."""
    from omegaconf import OmegaConf

    old = OmegaConf.create(to_yaml(compose(list(overrides))))
    for key in missing:
        parent, name = key.rsplit(".", 1)
        del OmegaConf.select(old, parent)[name]
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(old))
    return path


def test_a_run_written_before_the_key_existed_keeps_the_full_vocabulary(tmp_path):
    from fedllm.config import load_run_config

    path = _old_run_config(tmp_path, "model.tiny.vocab_size")
    assert load_run_config(path).model.tiny.vocab_size is None
    assert from_yaml(to_yaml(compose(["model=tiny"]))).model.tiny.vocab_size == 4096


def test_keys_an_older_run_lacks_take_todays_defaults_with_a_warning(tmp_path, caplog):
    from fedllm.config import load_run_config

    path = _old_run_config(tmp_path, "run.client_gpus", "train.lr",
                           overrides=("model=tiny", "adapter=ffa_lora", "federation.rounds=7"))
    with caplog.at_level("WARNING"):
        cfg = load_run_config(path)
    assert cfg.federation.rounds == 7  # what the run wrote is kept
    assert cfg.run.client_gpus == compose([]).run.client_gpus
    # A group's own default: the run's adapter group (FFA-LoRA), not the top-level default.
    assert cfg.train.lr == compose(["adapter=ffa_lora"]).train.lr != compose([]).train.lr
    assert "run.client_gpus" in caplog.text and "train.lr" in caplog.text


def test_a_config_sent_between_server_and_clients_must_be_complete(tmp_path):
    path = _old_run_config(tmp_path, "run.client_gpus")
    with pytest.raises(ConfigError, match="client_gpus"):
        from_yaml(path.read_text())


def test_resuming_a_run_that_predates_a_privacy_key_is_refused(tmp_path):
    from fedllm.config import load_run_config

    path = _old_run_config(tmp_path, "privacy.example.max_participations")
    assert load_run_config(path).privacy.example.max_participations == "auto"  # report, export
    with pytest.raises(ConfigError, match="privacy.example.max_participations.*new run"):
        load_run_config(path, resuming=True)


def test_the_lora_groups_keep_their_measured_32_x_4_and_small_clients_need_half_a_batch():
    """The README's LoRA figures ran 32 x 4 (the soft prompt runs 64 x 2, test above); a client
    needs at least half an expected batch (it then runs at q = 1), unless set; the command
    line still wins over a group."""
    from fedllm.config import compose, min_client_sequences

    assert min_client_sequences(compose([])) == 32
    assert min_client_sequences(compose(["train.batch_size=7"])) == 4
    assert min_client_sequences(compose(["data.min_client_sequences=50"])) == 50
    for adapter in ("lora", "ffa_lora"):
        cfg = compose([f"adapter={adapter}"])
        assert (cfg.train.batch_size, cfg.train.local_steps, min_client_sequences(cfg)) == (32, 4, 16)
    assert compose(["adapter=lora", "train.batch_size=64"]).train.batch_size == 64
