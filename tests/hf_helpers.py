"""Tiny randomly initialised Hugging Face models and data for the integration tests (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import sbpet

VOCAB = 97
MASK_ID = 4
LABEL_WORDS = (10, 20, 30)


def tiny_bert_config(**kw):
    from transformers import BertConfig

    args = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=len(LABEL_WORDS),
    )
    args.update(kw)
    return BertConfig(**args)


def tiny_gpt2_config(**kw):
    from transformers import GPT2Config

    args = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    args.update(kw)
    return GPT2Config(**args)


def tiny_regularizer(model, shift_labels=False, dims=(24, 6), bridge="brownian"):
    cfg = model.config
    return sbpet.BridgeRegularizer(
        cfg.hidden_size, cfg.num_hidden_layers, dims=dims, bridge=bridge,
        word_embeddings=model.get_input_embeddings().weight, shift_labels=shift_labels,
        backend="torch",
    )


def classification_batch(batch=4, seq=11, seed=0, mask_token=True):
    """input_ids with one [MASK] (id MASK_ID) per sequence, right padding, class labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, seq - 1 - 2 * (b % 3):] = 0
    ids[mask == 0] = 0
    if mask_token:
        for b in range(batch):
            ids[b, int(mask[b].sum()) - 2] = MASK_ID
    labels = torch.randint(0, len(LABEL_WORDS), (batch,), generator=gen)
    return ids, mask, labels


WORDS = ("the cat dog sat on mat ran fast slow market shares rose fell team won lost game film "
         "star music vote party election minister phone software chip profit bank").split()


def tiny_tokenizer(directory):
    """A BertTokenizerFast over a small vocabulary written to ``directory`` (no hub)."""
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + WORDS + [f"w{i}" for i in range(VOCAB - len(special) - len(WORDS))]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab[:VOCAB])})
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_texts(count=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(count):
        n = int(torch.randint(4, 14, (1,), generator=gen))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=gen)))
    return texts


def tiny_model_and_corpus(root):
    """A tiny random BertModel + tokenizer saved under root/model and a 3-class corpus of
    <class>/*.txt under root/data, in the layout the CLI reads (no hub, no demo packages)."""
    from transformers import BertModel

    model_dir, data_dir = os.path.join(str(root), "model"), os.path.join(str(root), "data")
    os.makedirs(model_dir, exist_ok=True)
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(model_dir)
    tiny_tokenizer(model_dir)
    topics = {"film": "film star music", "game": "team won lost game", "market": "market shares rose fell profit bank"}
    gen = torch.Generator().manual_seed(0)
    for name, words in topics.items():
        folder = os.path.join(data_dir, name)
        os.makedirs(folder, exist_ok=True)
        words = words.split()
        for i in range(8):
            text = " ".join(words[int(j)] for j in torch.randint(len(words), (8,), generator=gen))
            with open(os.path.join(folder, f"{i:03d}.txt"), "w") as f:
                f.write(text + " the cat sat\n")
    return model_dir, data_dir
