"""SecAgg+ secure aggregation (Bell et al. CCS 2020) on Flower's Message API: the whole story.
The protocol and its primitives live here, in the library both sides use:

  primitives.py  keys (X25519), Shamir shares, AES-GCM share encryption, AES-CTR masks,
                 stochastic quantization, the neighbour graph and the unmasking (pure numpy +
                 cryptography; no Flower)
and each side's stage beside the app that runs it (the library holds nothing specific to one
side):
  clients/secagg.py  (``fedllm.clients.secagg``) the ClientApp's four stages
                 (``fedllm.clients.app`` routes train messages carrying a ``secagg-stage`` key
                 there)
  server/secagg.py   (``fedllm.server.secagg``) ``SecAggPlus``, a wrapper strategy around the
                 adapter FedAvg that runs the four exchanges and hands the unmasked sum to
                 the next layer

One round, over a neighbour graph of the sampled clients (complete up to 20 clients, else a
random Harary graph of degree 2*ceil(1.5*log2 n)), threshold t a strict majority of shares:
  1. setup:  the server announces participants, neighbours, graph and t; each client checks
             them, makes two key pairs (c: share encryption, s: pairwise masks) and a
             self-mask seed b, and replies with its public keys;
  2. share:  the server forwards the neighbours' public keys; each client Shamir-shares b and
             s_sk among its neighbours and itself, each share encrypted for its holder;
  3. masked: the server forwards each client its encrypted shares with the global adapter;
             the client trains (DP as configured), quantizes its update to 2^bits levels on
             [-R, R] and sends y = Q(x) + PRG(b) + sum_v +-PRG(DH(s_u, s_v)) mod 2^32|64;
  4. unmask: if the survivors are connected in the graph (else no partial sum is ever
             unmasked), survivors reveal shares of b for survivors and of s_sk for dropped
             clients, never both for one client; the server removes the masks and
             dequantizes the sum.
The server learns only the survivors' sum, as long as it follows the protocol and fewer than
t of a client's neighbours collude with it (README, "Threat model").
"""

from fedllm.secagg.primitives import SecAggError, majority_threshold, share_count

__all__ = ["SecAggError", "majority_threshold", "share_count"]
