"""Data layer: vocabularies, synthetic prompts, seqio tasks and the offline store.

Nothing imported here pulls in TensorFlow, seqio or TFDS; `tasks` and the seqio parts of
`vocab` import them inside functions.
"""

from thack_jax.data.offline_store import (
    OfflineIterator,
    OfflineSpec,
    OfflineStore,
    StoreMismatchError,
    array_checksum,
    prompts_checksum,
)
from thack_jax.data.synthetic import SyntheticGrammar, prompt_stats, synthetic_prompts
from thack_jax.data.tasks import TASK_NAMES, load_examples, load_prompts, register_tasks
from thack_jax.data.vocab import SyntheticVocabulary, padded_vocab_size, sentencepiece_vocabulary

__all__ = [
    "TASK_NAMES",
    "OfflineIterator",
    "OfflineSpec",
    "OfflineStore",
    "StoreMismatchError",
    "SyntheticGrammar",
    "SyntheticVocabulary",
    "array_checksum",
    "load_examples",
    "load_prompts",
    "padded_vocab_size",
    "prompt_stats",
    "prompts_checksum",
    "register_tasks",
    "sentencepiece_vocabulary",
    "synthetic_prompts",
]
