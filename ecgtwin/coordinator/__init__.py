"""The coordinator's side of a federated run, without Flower: run settings, the round checkpoint (resume),
the metrics log and plot, the final model, and the launcher of a simulation. server/ (the Flower
ServerApp) drives the rounds; everything it keeps or writes goes through here. See docs/federation.md.

The run folder (`out`):

    out/state.npz          the round checkpoint: every stage's global weights so far, the server optimiser
                           moments (FedAdam), the completed rounds and the metrics history; written
                           atomically after every round, read back on start (resume)
    out/metrics.jsonl      one line per round: what each site reported, who refused and why, who failed
    out/metrics.png        loss and epsilon per site over the rounds
    out/model/             the global model as an ecgtwin checkpoint (what `ecgtwin generate` reads)
    out/status.json        finished | failed, with the reason (flwr run may exit 0 when a run failed)
"""
