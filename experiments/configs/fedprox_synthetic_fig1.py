"""FedAvg vs FedProx on Synthetic(alpha, beta) with stragglers: FedProx Fig. 1.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020, arXiv:1812.06127, Section 5 and
Figures 1-2. Setting: Synthetic(alpha, beta) data (`fedkd.synthetic`), 30
devices, 10 sampled per round, E = 20 local epochs of batch 10, SGD with
learning rate 0.01, multinomial logistic regression (`logreg`), and 0%, 50%
or 90% of the sampled devices made stragglers (a random number of epochs
in [1, E]). Three arms per panel:

* `fedavg (drops)`: the paper's FedAvg, which drops the stragglers: here
  `dropout_rate` = the straggler fraction (they never report);
* `fedavg (partial)`: the paper's "FedProx, mu = 0": stragglers send their
  partial work (`straggler_rate`, a uniform fraction of the local steps);
* `fedprox`: FedProx with mu = 1 and the partial work.

One panel, as a comparison of `fedavg` and `fedprox` (both with partial
work) through `experiments/compare.py`:

    python experiments/main.py \
        --config=experiments/configs/fedprox_synthetic_fig1.py:1,90 \
        --workdir=/tmp/fedprox_fig1_1_90

(`:ALPHA,PERCENT`, alpha = beta in {0, 0.5, 1}, stragglers in {0, 50, 90};
no argument = `:1,90`). All nine panels and all three arms, with the figures
docs/fedprox_fig1/fedprox_fig1_{loss,accuracy}.png and the numbers
docs/fedprox_fig1/fedprox_fig1.md:

    python experiments/fedprox_fig1.py --workdir=/tmp/fedprox_fig1 \
        --out=docs/fedprox_fig1

Hardware: the committed figure took 25 minutes on a 2-core CPU shared with
other jobs (load ~12; about 8 s of compilation and 0.15 s a round per arm).
It runs 100 rounds, not the paper's 200, and plots the global model's test
loss and accuracy on the devices' held-out 10%, where the paper plots the
training loss.

What the paper reports: on Synthetic(1,1) with 90% stragglers FedAvg's
training loss stalls or diverges, while FedProx (mu = 1) converges; partial
work alone (mu = 0) already helps, and mu > 0 makes training more stable as
heterogeneity grows (Synthetic(0,0) to (1,1)).

Where the committed run agrees (docs/fedprox_fig1/fedprox_fig1.md): the
ordering and the trend. With 90% stragglers, dropping them is the worst
arm on every data set (final test loss 0.63 / 1.86 / 2.40 on (0,0) /
(0.5,0.5) / (1,1), against 0.46 / 0.73 / 1.33 with partial work and 0.41 /
0.66 / 0.95 with mu = 1), and its loss jumps the most (up to 5.3 on (1,1));
mu = 1 has the lowest final loss on (0.5,0.5) and (1,1) at every straggler
rate, and its curves barely change with the straggler rate. Where it does
not: FedAvg does not diverge here (its loss oscillates between 2 and 5 on
(1,1) but stays finite); with 0% stragglers on Synthetic(1,1) FedAvg is
already unstable (loss 1.3 to 2.4), as in the paper's Figure 2 rather than
its Figure 1; and on Synthetic(0,0) with 50% stragglers dropping them ends
lowest (0.400, against 0.469 with partial work and 0.406 with mu = 1). One
seed, one run per arm, at commit d541543.

Differences: stragglers here are a Bernoulli draw per device (not exactly
x% of each cohort) and do a uniform fraction of their local steps (not a
whole number of epochs); client sizes are the paper code's lognormal(4, 2) +
50 (seed 0's largest is 889, under `synthetic_max_examples`); the model
starts from LeCun-normal weights, the paper's code from zeros.
`:smoke` runs 2 rounds on digits.
"""

from experiments.configs import default

ALPHAS = (0.0, 0.5, 1.0)
STRAGGLER_PERCENTS = (0, 50, 90)


def get_config(arg: str | None = None):
  """`arg`: 'ALPHA,PERCENT' (e.g. '0.5,50'), 'smoke', or None ('1,90')."""
  c = default.get_config()
  c.dataset = 'synthetic'
  c.synthetic_max_examples = 1000
  c.num_clients = 30
  c.clients_per_round = 10
  c.student = 'logreg'
  c.local_epochs = 20
  c.batch_size = 10
  c.client_lr = 0.01
  c.prox_mu = 1.0
  c.num_rounds = 100
  c.eval_every = 1
  c.compare = 'fedavg,fedprox'
  c.target_accuracy = 0.7
  panel = '1,90' if arg in (None, '', 'smoke') else arg
  try:
    alpha, percent = (float(v) for v in panel.split(','))
  except ValueError:
    raise ValueError(f'unknown config variant {arg!r}; use :ALPHA,PERCENT '
                     '(e.g. :0.5,50), :smoke or none') from None
  c.synthetic_alpha = c.synthetic_beta = alpha
  c.straggler_rate = percent / 100
  return default.variant(c, 'smoke' if arg == 'smoke' else None)


def arms(config) -> dict:
  """The panel's three runs (see the docstring): label -> config."""
  runs = {}
  for label, name, mu in (('fedavg (drops)', 'fedavg', 0.0),
                          ('fedavg (partial)', 'fedavg', 0.0),
                          ('fedprox (mu=1)', 'fedprox', config.prox_mu)):
    c = config.copy_and_resolve_references()
    c.algorithm, c.compare, c.prox_mu = name, '', mu
    if label.endswith('(drops)'):
      c.dropout_rate, c.straggler_rate = config.straggler_rate, 0.0
    runs[label] = c
  return runs
