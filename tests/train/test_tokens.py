"""data.tokenizer: a tokenizer trained here through `tokenizers`; the token cache, its key and its checks; the
text, jsonl, parquet and `datasets` sources (the rank-0 build with the other ranks waiting runs in
test_real_models.py)."""

import json
import re

import pytest

from ring_flash_attn.train import tokens
from ring_flash_attn.train.config import ConfigError, DataConfig, ModelConfig, RunConfig
from ring_flash_attn.train.data import documents
from ring_flash_attn.train.model import check_model, model_config

from .helpers import save_tiny_llama, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(40)))
    return tmp_path / "corpus" / "docs.jsonl"


def _data(tokenizer_dir, corpus, tmp_path, **fields):
    values = dict(source="files", path=str(corpus), format="jsonl", tokenizer=str(tokenizer_dir),
                  cache_dir=str(tmp_path / "cache"), seq_len=16)
    values.update(fields)
    return DataConfig(**values)


def _build(config):
    tokens_path, meta_path = tokens.cache_paths(config)
    tokens._build(config, tokens_path, meta_path)
    return tokens_path, meta_path


def test_cache_holds_each_document_then_eos(tokenizer_dir, corpus, tmp_path):
    config = _data(tokenizer_dir, corpus, tmp_path)
    tokens_path, meta_path = _build(config)
    assert tokens.verify(tokens_path, meta_path) is None
    stream, meta, fingerprint = tokens.load(config)
    tokenizer = tokens.load_tokenizer(str(tokenizer_dir))
    expected = []
    for doc in documents(config):
        expected += tokenizer(doc.decode(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.tolist() == expected and meta["tokens"] == len(expected)
    assert meta["max_token"] == max(expected) < len(tokenizer)
    assert tokens.load(config)[2] == fingerprint  # the same cache, the same fingerprint


def test_cache_key_follows_corpus_tokenizer_and_budget(tokenizer_dir, corpus, tmp_path):
    config = _data(tokenizer_dir, corpus, tmp_path)
    first = tokens.cache_paths(config)
    assert tokens.cache_paths(config) == first  # another run, another rank: the same files
    assert tokens.cache_paths(_data(tokenizer_dir, corpus, tmp_path, max_bytes=100)) != first
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert tokens.cache_paths(config) != first  # an edited corpus is tokenized again


@pytest.mark.parametrize("damage, message", [
    (lambda t, m: t.write_bytes(t.read_bytes()[:-4]), r"has \d+ bytes, .*\.json says \d+"),
    (lambda t, m: t.write_bytes(bytes([t.read_bytes()[0] ^ 1]) + t.read_bytes()[1:]),
     "does not match its CRC32 .* \\(corrupt\\)"),
    (lambda t, m: m.write_text("{"), "is unreadable"),
    (lambda t, m: m.write_text("[1, 2]"), "is not the metadata of a token cache"),
    (lambda t, m: m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "eos"})),
     r"is not the metadata of a token cache \(expected a JSON object with the integers tokens, crc32, max_token, "
     r"eos\)"),
])
def test_corrupt_cache_is_reported_not_rebuilt(tokenizer_dir, corpus, tmp_path, damage, message):
    tokens_path, meta_path = _build(_data(tokenizer_dir, corpus, tmp_path))
    damage(tokens_path, meta_path)
    before = tokens_path.read_bytes()
    problem = tokens.verify(tokens_path, meta_path)
    assert problem is not None and "delete both files to rebuild it" in problem
    assert re.search(message, problem), problem
    assert tokens_path.read_bytes() == before  # nothing overwritten


def test_random_model_embedding_fits_the_tokenizer(tokenizer_dir, corpus, tmp_path):
    hf_config = model_config(RunConfig(data=_data(tokenizer_dir, corpus, tmp_path)))
    assert hf_config.vocab_size == 320  # 300 tokens (+ specials) padded to a multiple of 64


def test_tokenizer_larger_than_the_pretrained_embedding_is_refused(tmp_path, corpus):
    model = save_tiny_llama(tmp_path / "model")  # 320 embedding rows
    big = save_tiny_tokenizer(tmp_path / "big_tokenizer", vocab_size=400)
    config = RunConfig(model=ModelConfig(pretrained=str(model)), data=_data(big, corpus, tmp_path))
    with pytest.raises(ConfigError, match=r"data.tokenizer .*: 400 token ids, more than the 320 rows of the "
                                          r"embedding of model.pretrained"):
        check_model(config, "sdpa")


def test_missing_tokenizer_directory(tmp_path, corpus):
    with pytest.raises(ConfigError, match="data.tokenizer .*absent.*: no such directory"):
        tokens.vocab_size(_data(tmp_path / "absent", corpus, tmp_path))


def test_parquet_and_saved_dataset_sources(tmp_path):
    pyarrow = pytest.importorskip("pyarrow.parquet", reason="parquet needs pyarrow (pip install .[data])")
    datasets = pytest.importorskip("datasets", reason="data.format hf_dataset needs datasets (pip install .[data])")
    import pyarrow as pa

    texts = ["first document", "second", "third one"]
    pyarrow.write_table(pa.table({"text": texts, "id": [1, 2, 3]}), tmp_path / "part.parquet")
    parquet = DataConfig(source="files", path=str(tmp_path), format="parquet")
    assert list(documents(parquet)) == [t.encode() for t in texts]
    # A fingerprint given, not hashed: datasets hashes tables through dill, which fails on some pyarrow builds.
    table = datasets.table.InMemoryTable(pa.table({"text": texts}))
    datasets.Dataset(table, fingerprint="test").save_to_disk(str(tmp_path / "saved"))
    saved = DataConfig(source="files", path=str(tmp_path / "saved"), format="hf_dataset")
    assert list(documents(saved)) == [t.encode() for t in texts]
    with pytest.raises(ConfigError, match="data.text_key: .* has no column 'body'"):
        list(documents(DataConfig(source="files", path=str(tmp_path / "saved"), format="hf_dataset",
                                  text_key="body")))


def test_a_build_killed_midway_leaves_nothing_behind_the_next(tokenizer_dir, corpus, tmp_path):
    """A rank 0 killed while tokenizing leaves its temporary file (as large as the cache); the next build, which
    holds the cache's lock, removes it."""
    config = _data(tokenizer_dir, corpus, tmp_path)
    tokens_path, meta_path = tokens.cache_paths(config)
    tokens_path.parent.mkdir(parents=True)
    stale = tokens_path.with_name(f"{tokens_path.name}.tmp99999")
    stale.write_bytes(b"\0" * 1000)
    tokens.build_if_missing(config, tokens_path, meta_path)
    assert sorted(p.name for p in tokens_path.parent.iterdir()) == sorted(
        [tokens_path.name, meta_path.name, tokens_path.with_suffix(".lock").name])
    assert tokens.verify(tokens_path, meta_path) is None
