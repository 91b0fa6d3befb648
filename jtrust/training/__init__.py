"""Training: the generic loop for any parameter pytree (`loop`), language-model training on top
of it (`lm`), and unlearning objectives (`unlearn`).

    from jtrust import training
    result = training.train(model, training.packed_examples(ids, 256), training.TrainConfig(steps=100), "runs/x")
"""

from jtrust.training.lm import (NLL, Examples, Objective, TrainResult, full_params, group_rows, lm_loss,
                                packed_examples, perplexity_eval, prompt_answer_examples, take, token_examples,
                                token_log_probs, token_loss_sum, train, ungroup)
from jtrust.training.loop import (DTYPES, FitResult, LossFn, PostUpdate, TrainConfig, TrainState, batch_indices, fit,
                                  log_spaced_steps, make_optimizer, make_train_step, schedule)
from jtrust.io.runs import restore_state

__all__ = ["DTYPES", "Examples", "FitResult", "LossFn", "NLL", "PostUpdate", "Objective", "TrainConfig", "TrainResult",
           "TrainState", "batch_indices", "fit", "full_params", "group_rows", "lm_loss", "log_spaced_steps",
           "make_optimizer", "make_train_step", "packed_examples", "perplexity_eval",
           "prompt_answer_examples", "restore_state", "schedule", "take", "token_examples", "token_log_probs",
           "token_loss_sum", "train", "ungroup"]
