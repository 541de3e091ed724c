"""Inputs that used to fail far from their cause now fail naming it: a seed outside numpy's 32 bits, a DataFrame
given as a dataset (its [0] is a column), a parquet/CSV/arrow/gzip file given as JSON-lines examples."""

import gzip

import pytest

from tests.support.engine import Regression, make_data, make_model
from paperloop import ConfigError, TrainerConfig
from paperloop.lm import load_examples


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_a_seed_numpy_cannot_take_is_refused_naming_the_key(seed):
    with pytest.raises(ConfigError, match=rf"^seed: must be in \[0, 2\*\*32 - 1\], got {seed}"):
        TrainerConfig(seed=seed)
    assert TrainerConfig(seed=2**32 - 1).seed == 2**32 - 1


class DataFrame:
    """What matters of a pandas DataFrame here: a length, and [key] selecting a column (KeyError: 0 for a row)."""
    __module__ = "pandas.core.frame"

    def __init__(self, columns: dict):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key):
        return self.columns[key]


def test_a_dataframe_is_refused_pointing_to_datasets(tmp_path):
    frame = DataFrame({"prompt": ["1 + 1 ="], "completion": [" 2"]})
    with pytest.raises(TypeError, match=r"examples: is a pandas DataFrame, whose \[i\] selects a column.*"
                                        r"datasets\.Dataset\.from_pandas\(df\)"):
        load_examples(frame)
    with pytest.raises(TypeError, match=r"train_data: is a pandas DataFrame.*from_pandas"):
        Regression(make_model(), TrainerConfig(output_dir=str(tmp_path)), train_data=frame)
    Regression(make_model(), TrainerConfig(output_dir=str(tmp_path)), train_data=make_data(8))  # a dataset of rows


@pytest.mark.parametrize("name, data, reader", [
    ("train.parquet", b"PAR1\x15\x04\x15\x00\xff\xfe", r'load_dataset\("parquet", data_files=.*train\.parquet'),
    ("data.bin", b"PAR1\x00\x00", r'load_dataset\("parquet"'),  # told by its first bytes, whatever its name
    ("train.csv", b"prompt,completion\n1 + 1 =, 2\n", r'load_dataset\("csv", data_files='),
    ("train.tsv", b"prompt\tcompletion\n", r'load_dataset\("csv", data_files=.*delimiter'),
    ("train.arrow", b"ARROW1\x00\x00", r"Dataset\.from_file\("),
    ("train.jsonl.gz", gzip.compress(b'{"text": "1"}\n', mtime=0), r'load_dataset\("json", data_files='),
])
def test_a_data_file_that_is_not_json_lines_is_named_with_its_reader(tmp_path, name, data, reader):
    path = tmp_path / name
    path.write_bytes(data)
    kind = name.split(".")[-1] if name != "data.bin" else "parquet"
    kind = {"gz": "gzip"}.get(kind, kind)
    with pytest.raises(ValueError, match=rf"{name}: is a {kind} file, and a path as examples is read as JSON "
                                         rf"lines.*{reader}"):
        load_examples(path)


def test_a_json_lines_file_still_loads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n\n{"text": "3"}\n')
    assert load_examples(path) == [{"prompt": "1 + 1 =", "completion": " 2"}, {"text": "3"}]
