"""The data pipeline: load -> format -> tokenize and mask -> length rule -> pack -> cache -> loader.

    from jaxtune.data import load_tokenizer, prepare_datasets, make_loader
    tokenizer = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tokenizer)
    loader = make_loader(data.train, batch_size=..., seed=cfg.seed,
                         shuffle=cfg.shuffle_merged_datasets)
    batch = next(loader)          # see jaxtune/data/loader.py for the batch contract
    state = loader.get_state()    # save with the checkpoint; loader.set_state(state) resumes
"""

from jaxtune.data.examples import FIELDS, Examples
from jaxtune.data.loader import Loader, make_loader
from jaxtune.data.masking import IGNORE_INDEX
from jaxtune.data.prepare import PreparedData, build_examples, prepare_datasets
from jaxtune.data.report import DataReport
from jaxtune.data.rows import TokenizedRows
from jaxtune.data.tokenizer import load_tokenizer

__all__ = ["FIELDS", "IGNORE_INDEX", "DataReport", "Examples", "Loader", "PreparedData",
           "TokenizedRows", "build_examples", "load_tokenizer", "make_loader", "prepare_datasets"]
