"""The `clients` mesh: cohort layout and where state lives."""

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from fedkd import algorithm
from fedkd import algorithms
from fedkd import clients
from fedkd import layers
from fedkd import sharding
from fedkd.errors import FedkdError
import toys


def _collectives(hlo: str, in_loops: bool = False) -> list[str]:
  """The kinds of collective ops in compiled `hlo`, or in its loop bodies
  and conditions only (`in_loops`; it must have loops)."""
  loops = set(re.findall(r'(?:body|condition)=%?([\w.-]+)', hlo))
  assert loops or not in_loops, 'no loops in the HLO'
  found = []
  for computation in re.split(r'\n(?=\S)', hlo):
    name = re.match(r'(?:ENTRY )?%?([\w.-]+)', computation)
    if not in_loops or (name and name[1] in loops):
      found += re.findall(r' (all-reduce|all-gather|reduce-scatter|'
                          r'all-to-all|collective-permute)(?:-start)?\(',
                          computation)
  return found


class ShardingTest(parameterized.TestCase):

  @parameterized.parameters(
      # (clients_per_round, devices, clients_per_chunk) -> (size, chunk)
      (10, 1, 0, 10, 0), (10, 8, 0, 16, 0), (100, 8, 0, 104, 0),
      (100, 8, 30, 128, 32), (100, 2, 25, 104, 26), (5, 2, 1, 6, 2),
      (20, 4, 64, 20, 0))
  def test_cohort_layout(self, per_round, devices, per_chunk, size, chunk):
    mesh = sharding.make_mesh(devices)
    self.assertEqual(
        sharding.cohort_layout(per_round, mesh, per_chunk), (size, chunk))

  @parameterized.parameters(
      # (bytes a client trains, clients per round, devices) -> chunk
      (74_000, 1000, 1, 112),  # 113 a device: 9 chunks of 112
      (74_000, 1000, 8, 500),  # 8 x 113 = 904 a chunk: 2 of 500
      (74_000, 900, 8, 0),  # 904 >= 900: one chunk
      (13_000_000, 50, 2, 2),  # one client a device
      (13_000_000, 5, 1, 1),
      (60_000_000, 10, 2, 2),
      (100, 10, 1, 0))
  def test_chunk_for(self, client_bytes, per_round, devices, chunk):
    self.assertEqual(sharding.chunk_for(client_bytes, per_round, devices),
                     chunk)

  def test_a_device_per_core_is_suggested_only_for_one_cpu_device(self):
    hint = sharding.device_split_hint('cpu', 1, 8)
    self.assertIn('XLA_FLAGS=--xla_force_host_platform_device_count=8', hint)
    self.assertIn('8 CPU cores run as one XLA device', hint)
    for backend, devices, cores in [('cpu', 1, 1), ('cpu', 2, 8),
                                    ('cpu', 8, 8), ('gpu', 1, 16),
                                    ('tpu', 1, 96)]:
      self.assertEqual(sharding.device_split_hint(backend, devices, cores),
                       '', msg=(backend, devices, cores))

  def test_auto_chunk_counts_params_client_state_and_activations(self):
    alg = toys.algorithms(16)['local_kd']  # private teachers: per-client
    state = toys.init_state(alg)
    client_bytes = (algorithm.tree_bytes(state.params)
                    + algorithm.tree_bytes(state.clients) // 16)
    per_device = sharding._CHUNK_BYTES_PER_DEVICE // client_bytes
    self.assertEqual(
        sharding.auto_chunk(jax.eval_shape(lambda: state), 16,
                            4 * per_device + 1, sharding.make_mesh(1)),
        -(-(4 * per_device + 1) // 5))
    self.assertEqual(sharding.auto_chunk(state, 16, per_device,
                                         sharding.make_mesh(1)), 0)
    # A local step's activations as large again: the cohort that fitted in
    # one chunk takes two or three.
    chunk = sharding.auto_chunk(state, 16, per_device, sharding.make_mesh(1),
                                step_bytes=client_bytes)
    self.assertEqual(chunk, sharding.chunk_for(2 * client_bytes, per_device,
                                               1))
    self.assertBetween(-(-per_device // chunk), 2, 3)

  @parameterized.parameters((8, P('clients')), (6, P()))
  def test_per_client_state_is_split_when_it_divides(self, clients, spec):
    alg = toys.algorithms(clients)['local_kd']
    state = toys.init_state(alg)
    shardings = sharding.state_sharding(state, sharding.make_mesh(8))
    for s in jax.tree.leaves(shardings.clients):
      self.assertEqual(s.spec, spec)
    for s in jax.tree.leaves(shardings.replace(clients=())):
      self.assertEqual(s.spec, P())
    placed = jax.device_put(state, shardings)
    teachers = jax.tree.leaves(placed.clients)[0]
    self.assertEqual(teachers.addressable_shards[0].data.shape[0],
                     clients // 8 if spec == P('clients') else clients)

  def test_client_examples_are_split_by_rows_and_gathered_per_client(self):
    sizes = (7, 3, 12, 5, 9, 1)  # 37 rows: 8 devices hold 5 each, 3 padding
    data = toys.toy_data(sizes)
    placed = sharding.place_data(data, sharding.make_mesh(8))
    for a in (placed.x, placed.y):
      self.assertEqual([s.data.shape[0] for s in a.addressable_shards],
                       [5] * 8)
    # Copied, or on one device: every device holds the 37 rows, which the
    # clients read directly.
    for copied in (sharding.place_data(data, sharding.make_mesh(8), False),
                   sharding.place_data(data, sharding.make_mesh(1))):
      self.assertFalse(copied.split_rows)
      self.assertEqual({s.data.shape[0] for s in copied.x.addressable_shards},
                       {37})
    self.assertTrue(placed.split_rows)
    self.assertEqual(placed.offsets.addressable_shards[0].data.shape, (6,))
    ids = np.array([4, 0, 5], np.int32)
    x, y = jax.jit(lambda d: d.rows_of(ids))(placed)
    self.assertEqual(x.shape[:2], (3, 12))
    for row, client in enumerate(ids):
      own = slice(data.offsets[client], data.offsets[client] + sizes[client])
      np.testing.assert_array_equal(x[row, :sizes[client]], data.x[own])
      np.testing.assert_array_equal(y[row, :sizes[client]], data.y[own])

  def test_cohort_rows_and_states_arrive_split_once_a_round(self):
    # 16 clients, their private teachers and examples split over 8 devices;
    # a cohort of 8: each device receives its one slot's teacher and rows,
    # by reduce-scatter, before the local steps, which then run without
    # collectives (reading each step's batch from the split rows instead
    # puts an all-reduce in the step loop).
    alg = toys.algorithms(16)['local_kd']
    state, data = toys.init_state(alg), toys.toy_data([3] * 16)
    cohort = toys.cohort([9, 0, 4, 15, 7, 2, 12, 5])
    rounds = []
    for devices in (1, 8):
      mesh = sharding.make_mesh(devices)
      placed = sharding.place_data(data, mesh)
      shardings = sharding.state_sharding(state, mesh)
      compiled = sharding.jit_round(
          alg.apply, mesh, shardings, sharding.data_sharding(placed, mesh)
      ).lower(state, placed, cohort, jax.random.PRNGKey(0)).compile()
      rounds.append(compiled(jax.device_put(state, shardings), placed,
                             cohort, jax.random.PRNGKey(0)))
    toys.assert_trees_close(rounds[0], rounds[1])
    hlo = compiled.as_text()
    scattered = re.findall(r'= (\w+\[[\d,]*\])\S* reduce-scatter\(', hlo)
    teachers = [f'f32[{",".join(map(str, (1, *leaf.shape[1:])))}]'
                for leaf in jax.tree.leaves(state.clients)]
    self.assertCountEqual(scattered, teachers + ['f32[1,3,4,4,1]',
                                                 's32[1,3]'])
    self.assertEqual(_collectives(hlo, in_loops=True), [])

  @parameterized.named_parameters(
      # 16 rows on 8 devices, 2 each; 8 slots, one a device.
      ('own_rows', [0, 2, 4, 6, 8, 10, 12, 14], True),
      ('other_own_rows', [1, 3, 5, 7, 9, 11, 13, 15], True),
      ('one_elsewhere', [2, 0, 4, 6, 8, 10, 12, 14], False),
      ('reversed', [15, 13, 11, 9, 7, 5, 3, 1], False),
      # 16 slots, two a device: each device holds its first slot's row only.
      ('half_held', [0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14, 1],
       False))
  def test_rows_held_by_their_slots_devices_move_without_exchange(
      self, index, held):
    mesh = sharding.make_mesh(8)
    split = jax.sharding.NamedSharding(mesh, P('clients'))
    table = jax.device_put(np.arange(48, dtype=np.float32).reshape(16, 3),
                           split)
    values = -1.0 - jnp.arange(3 * len(index), dtype=jnp.float32).reshape(
        len(index), 3)
    index = jax.device_put(np.array(index, np.int32), split)

    def rows(table, index, values):
      here = clients.rows_held_here(index, 16)
      taken = [clients.take_rows(table, index, h) for h in (here, False)]
      put = [clients.put_rows(table, index, values, h) for h in (here, False)]
      return here, taken, put

    here, taken, put = jax.jit(sharding._on_mesh(rows, mesh))(
        table, index, values)
    self.assertEqual(bool(here), held)
    for got in taken:
      np.testing.assert_array_equal(got, np.asarray(table)[index])
    for got in put:
      np.testing.assert_array_equal(
          got, np.asarray(table.at[index].set(values)))
    # Held here, nothing but the rows asked for moves; otherwise a
    # reduce-scatter brings them and an all-gather puts them back.
    for here, collectives in ((True, []),
                              (False, ['all-gather', 'reduce-scatter'])):
      hlo = jax.jit(sharding._on_mesh(lambda t, i, v, h=here: (
          clients.take_rows(t, i, h), clients.put_rows(t, i, v, h)),
                                      mesh)).lower(
          table, index, values).compile().as_text()
      self.assertCountEqual(set(_collectives(hlo)), collectives)

  def test_writes_past_the_table_are_dropped_in_place(self):
    # As a round writes back a dropped or padded slot (past the table)
    # while every slot reads a row its device holds: only the others write.
    mesh = sharding.make_mesh(8)
    split = jax.sharding.NamedSharding(mesh, P('clients'))
    table = np.arange(48, dtype=np.float32).reshape(16, 3)
    read = np.arange(0, 16, 2, dtype=np.int32)
    write = np.where(np.arange(8) % 3 == 1, 16, read).astype(np.int32)
    values = -1.0 - np.arange(24, dtype=np.float32).reshape(8, 3)

    def put(table, read, write, values):
      here = clients.rows_held_here(read, 16)
      return here, clients.put_rows(table, write, values, here)

    here, got = jax.jit(sharding._on_mesh(put, mesh))(
        *(jax.device_put(a, split) for a in (table, read, write)), values)
    self.assertTrue(bool(here))
    kept = write < 16
    table[write[kept]] = values[kept]
    np.testing.assert_array_equal(got, table)

  def test_whole_population_rounds_read_and_write_states_in_place(self):
    # All 16 clients every round, sorted as `sample_cohort` sorts them: each
    # device's slots hold its own clients, whose teachers stay on it.
    alg = algorithm.with_round(toys.algorithms(16)['local_kd'],
                               clients_per_chunk=8)
    state, data = toys.init_state(alg), toys.toy_data([3] * 16)
    for ids in (list(range(16)), [3, 0, 1, 2] + list(range(4, 16))):
      cohort = toys.cohort(ids)
      rounds = []
      for devices in (1, 8):
        mesh = sharding.make_mesh(devices)
        placed = sharding.place_data(data, mesh)
        shardings = sharding.state_sharding(state, mesh)
        rounds.append(sharding.jit_round(
            alg.apply, mesh, shardings, sharding.data_sharding(placed, mesh))(
                jax.device_put(state, shardings), placed, cohort,
                jax.random.PRNGKey(0)))
      toys.assert_trees_close(rounds[0], rounds[1])

  @parameterized.named_parameters(
      # 48 examples: the cohort's 16 x 3 padded rows gathered up front.
      ('even', [3] * 16, []),
      # 32 examples, padded to 16 x 9 rows: each chunk gathers its own.
      ('skewed', [9] + [1] * 14 + [9],
       ['all-gather'] + ['reduce-scatter'] * 2))
  def test_chunked_round_sums_uploads_on_each_device_until_the_end(
      self, sizes, collectives_in_loop):
    # 16 slots over 8 devices, in chunks of 8: each device keeps its own
    # running sums, and the round all-reduces them once, after the chunks;
    # the cohort's rows arrive before the chunks where they take no more
    # room than the examples.
    alg = toys.algorithms(16)['fedavg']
    state, data = toys.init_state(alg), toys.toy_data(sizes)
    cohort = toys.cohort(list(range(16)))
    chunked = algorithm.with_round(alg, clients_per_chunk=8)
    rounds = []
    for devices in (1, 8):
      mesh = sharding.make_mesh(devices)
      placed = sharding.place_data(data, mesh)
      compiled = sharding.jit_round(
          chunked.apply, mesh, sharding.state_sharding(state, mesh),
          sharding.data_sharding(placed, mesh)
      ).lower(state, placed, cohort, jax.random.PRNGKey(0)).compile()
      rounds.append(compiled(state, placed, cohort, jax.random.PRNGKey(0)))
    toys.assert_trees_close(rounds[0], rounds[1])
    self.assertTrue(placed.split_rows)
    self.assertCountEqual(_collectives(compiled.as_text(), in_loops=True),
                          collectives_in_loop)
    self.assertIn('all-reduce', _collectives(compiled.as_text()))

  def test_local_steps_update_parameters_in_place_on_cpu(self):
    # XLA:CPU's default copy insertion copied some of the parameters the
    # vmapped local-step loop carries, every step (here the second layer's
    # [16, 8, 3] kernels); `jit_round` asks for its region analysis.
    alg = toys.algorithms(16)['fedavg']
    state, data = toys.init_state(alg), toys.toy_data([3] * 16)
    hlo = sharding.jit_round(alg.apply, sharding.make_mesh(1)).lower(
        state, data, toys.cohort(list(range(16))),
        jax.random.PRNGKey(0)).compile().as_text()
    copied = re.findall(r'= f32\[([\d,]+)\]\S* copy\(', hlo)
    stacked = [','.join(map(str, (16, *leaf.shape)))
               for leaf in jax.tree.leaves(state.params)]
    self.assertTrue(copied)  # the check would see copies
    self.assertFalse(set(copied) & set(stacked))

  def test_each_device_convolves_its_own_clients(self):
    # 16 clients with their own kernels, split over 8 devices: each device
    # runs its 2 clients' convolutions (`conv_cpu`'s batching rule), where
    # XLA's partitioner would gather every client's operands.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2, 6, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(16, 3, 3, 3, 4)).astype(np.float32)

    def steps(_, x, kernel):  # local steps of one client
      loss = lambda k: jnp.sum(jnp.tanh(layers.conv(x, k)))
      return jax.lax.fori_loop(
          0, 2, lambda _, k: k - 0.1 * jax.grad(loss)(k), kernel)

    mapped = lambda x, k: clients.map_clients(steps)((), x, k)
    want = jax.jit(mapped)(x, kernel)
    mesh = sharding.make_mesh(8)
    split = jax.NamedSharding(mesh, P('clients'))
    compiled = jax.jit(sharding._on_mesh(mapped, mesh), in_shardings=split,
                       out_shardings=split).lower(x, kernel).compile()
    np.testing.assert_allclose(compiled(x, kernel), want, rtol=1e-5,
                               atol=1e-5)
    self.assertEqual(_collectives(compiled.as_text()), [])

  def test_init_trains_each_clients_share_on_its_device(self):
    # fedmd's transfer learning for 16 clients, their examples split over 8
    # devices: each device trains its 2 clients from their rows, gathered
    # once by reduce-scatter, and no local step reads across devices.
    alg = algorithms.fedmd(
        model=toys.student(), input_shape=toys.INPUT_SHAPE, num_clients=16,
        num_public=toys.NUM_PUBLIC, num_classes=toys.NUM_CLASSES,
        client_tx=optax.sgd(0.1), epochs=1, batch_size=2, digest_epochs=1,
        public_batch_size=2, transfer_epochs=1, private_epochs=1)
    data = toys.toy_data([3] * 16).replace(
        public_y=jnp.arange(toys.NUM_PUBLIC) % toys.NUM_CLASSES)
    states = []
    for devices in (1, 8):
      mesh = sharding.make_mesh(devices)
      args = None, jax.random.PRNGKey(0), sharding.place_data(data, mesh)
      init = sharding.jit_init(alg.init, mesh)
      states.append(init(*args))
    toys.assert_trees_close(states[0], states[1])
    for leaf in jax.tree.leaves(states[1].clients):
      self.assertEqual(leaf.addressable_shards[0].data.shape[0], 2)
    hlo = init.lower(*args).compile().as_text()
    self.assertCountEqual(_collectives(hlo),
                          ['reduce-scatter', 'reduce-scatter'])
    self.assertEqual(_collectives(hlo, in_loops=True), [])
    # fd's tables of its clients' own uploads start as plain zeros, not per
    # client: they are split all the same.
    fd = sharding.jit_init(toys.algorithms(16)['fd'].init, mesh)(
        None, jax.random.PRNGKey(0))
    for leaf in jax.tree.leaves(fd.clients):
      self.assertEqual(leaf.addressable_shards[0].data.shape[0], 2)

  def test_refuses_sharding_dependent_random_bits(self):
    # The library never flips global JAX flags; it refuses the one setting
    # under which sharded and unsharded runs would differ.
    with jax.threefry_partitionable(False):
      with self.assertRaisesRegex(FedkdError, 'jax_threefry_partitionable'):
        sharding.make_mesh(2)


if __name__ == '__main__':
  absltest.main()
