"""ONP — Optimized Neuron Pruning: GNN + reinforcement learning over per-layer neuron graphs.

graph.py builds one graph per neuron layer, features.py computes trigger-free node
features from clean data, gnn.py is the policy/value network, reward.py the
clean-data reward with its backdoor scores, agent.py the policy-gradient learner and
search.py the ``repair`` entry point that ties them together.
"""
