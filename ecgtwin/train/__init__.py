"""Training: one local pass of each stage (VAE, IBE, twin), as a function of values.

    inputs.py       what each stage trains on, from a store and the frozen earlier stages
    losses.py       each stage's loss on one batch (per record or per patient)
    result.py       PassResult (weights, summary, local log, ledger entry) and the pass's rows
    local.py        the non-private pass (and the stage builders `ecgtwin train` shares)
    private.py      the patient-level DP-SGD pass (Opacus), charged to the site's ledger
    public.py       the public negatives of the IBE's DP objective
    centralised.py  `ecgtwin train`: one stage into a checkpoint folder, resumable
"""
