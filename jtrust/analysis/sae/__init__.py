"""Sparse autoencoders in JAX: the LFP paper's tied ReLU + L1, TopK, BatchTopK (both with AuxK)
and JumpReLU (`architectures`); several trained in one compiled program through the generic
loop (`train`); SAELens's metrics and the reconstruction spliced into the model (`metrics`);
SAELens's file format (`saelens`). Method, API and benchmark: docs/sae.md.

    from jtrust.analysis import sae
    acts = jtrust.extract(model, texts, sites=("mlp_out",), layers=[3, 5], pool="all", out_dir="runs/acts")
    config = sae.SAEConfig(d_in=576, width=1152)                 # the paper's tied ReLU + L1
    run = sae.train_saes([acts.get("mlp_out", l) for l in (3, 5)], config,
                         sae.sae_train_config(steps=2000, batch_size=32), "runs/sae")
    sae.reconstruction_metrics(run.one(0), config, acts.get("mlp_out", 3))
    sae.spliced_losses(model, examples, run.one(0), config, layer=3)   # ce_loss_score, kl_div_score
    sae.mmcs(sae.decoder(small, small_config), sae.decoder(big, big_config))
    sae.save("runs/sae/layer3", run.one(0), config, hook_name="blocks.3.hook_mlp_out")
"""

from jtrust.analysis.sae.architectures import (ARCHITECTURES, SAEConfig, SAEOutput, decoder, encode, forward,
                                               init, jump_relu, loss, step_function)
from jtrust.analysis.sae.metrics import (mmcs, mmcs_by_layer, reconstruction_metrics, splice, spliced_losses,
                                         zero_ablation)
from jtrust.analysis.sae.saelens import load, save
from jtrust.analysis.sae.train import SAERun, init_stack, sae_train_config, train_saes

__all__ = ["ARCHITECTURES", "SAEConfig", "SAEOutput", "SAERun", "decoder", "encode", "forward", "init",
           "init_stack", "jump_relu", "load", "loss", "mmcs", "mmcs_by_layer", "reconstruction_metrics", "save",
           "sae_train_config", "splice", "spliced_losses", "step_function", "train_saes", "zero_ablation"]
