"""A tiny de-identification model for the PHI guard's ``phi_model`` tests, built locally (nothing from a hub): a
transformers token-classification BERT with no layers and a WordPiece tokenizer of a few words, its weights set
so that each listed word is tagged with its label and every other token (``[UNK]``) with ``O``. Real transformers,
tokenizer and pipeline; only the weights are chosen instead of trained."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def write_tiny_deid_model(path: Path, tagged: dict[str, str], context: int = 16, positions: int = 64,
                          random_layers: int = 0) -> Path:
    """A model folder at ``path`` tagging each word of ``tagged`` (lower case) as ``B-<label>`` (or the ``I-<label>``
    given: the word continues an entity begun before it); ``context``: the
    tokenizer's model_max_length, which the guard's chunks fill; ``positions``: the model's position embeddings
    (fewer than ``context`` make a full chunk fail inside the model). ``random_layers``: that many attention layers
    and seeded random weights instead (tags at random, and a padded token would change the others' if the mask
    failed)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(tagged))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tags = {word: label if label[:2] in ("B-", "I-") else f"B-{label}" for word, label in tagged.items()}
    labels = ["O"] + sorted(set(tags.values()))
    config = BertConfig(vocab_size=len(vocab), hidden_size=max(8, len(vocab)), num_hidden_layers=random_layers,
                        num_attention_heads=1, intermediate_size=4, max_position_embeddings=positions, initializer_range=0.3,
                        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForTokenClassification(config)
    with torch.no_grad():
        if random_layers:
            model.classifier.bias[0] = 1.5  # about half the words O (so the tags a leak would move are many)
        else:
            for p in model.parameters():
                p.zero_()
            # one dimension per word (the LayerNorm keeps it the largest), read by the classifier row of its label;
            # a token with no dimension of its own normalises to zeros and takes O by its bias
            model.bert.embeddings.LayerNorm.weight.fill_(1.0)
            model.classifier.bias[0] = 1.0
            for word, tag in tags.items():
                model.bert.embeddings.word_embeddings.weight[vocab[word], vocab[word]] = 1.0
                model.classifier.weight[labels.index(tag), vocab[word]] = 10.0
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", model_max_length=context).save_pretrained(path)
    return path
