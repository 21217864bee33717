"""Federated training: FedAvg over clients that each train the Decoder on their own token shard, with
pairwise-mask secure aggregation (the server learns only the sum of the updates) and optional
differential privacy on each client's update (clip + Gaussian noise).

Processes: `python -m lmloom.federated.server ...` and one `python -m lmloom.federated.client ...` per
client, talking over a small framed protocol on loopback (`protocol.py`); `launch.py` starts a server and
N clients on one machine. `secagg.py` is the cryptography (X25519 pairwise seeds, AES-CTR masks,
fixed-point encoding), `local.py` the training that runs inside a client and the centralised baseline.
"""
