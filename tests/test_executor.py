"""Tests for vpd_jax/programs/executor.py and sandbox.py: static checks, limits, worker pool."""

import os
import sys
import time

import numpy as np
import pytest

from vpd_jax.programs import executor as executor_lib
from vpd_jax.programs import sandbox
from vpd_jax.programs.executor import ExecutionResult, ProgramExecutor, ProgramRejected
from vpd_jax.worlds import questions

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
import hostile_programs  # pylint: disable=g-import-not-at-top,g-bad-import-order

_TEST_NAMESPACE = hostile_programs.make_test_namespace


def _body(*lines: str) -> str:
  return "def execute_command(image):\n" + "".join(f"    {line}\n" for line in lines)


@pytest.fixture(scope="module")
def example():
  return questions.generate_example(seed=3, index=1)


@pytest.fixture(scope="module")
def pool():
  with ProgramExecutor(num_workers=2, timeout_s=1.0, cpu_time_s=1.0, memory_mb=256) as ex:
    yield ex


# -- static checks ------------------------------------------------------------------------


def test_check_program_returns_module_for_valid_program():
  tree = sandbox.check_program(hostile_programs.valid_program())
  assert tree.body[0].name == "execute_command"


@pytest.mark.parametrize("program, kind, line", [
    ("def f(:\n  pass\n", "syntax", 1),
    ("x = 1\nimport os\n", "forbidden", 2),
    ("def execute_command(image):\n  return image.__class__\n", "forbidden", 2),
    ("def execute_command(image):\n  return '{0.__class__}'.format(image)\n", "forbidden", 2),
])
def test_check_program_rejects_with_kind_and_line(program, kind, line):
  with pytest.raises(ProgramRejected) as info:
    executor_lib.check_program(program)
  assert (info.value.kind, info.value.line) == (kind, line)


def test_non_text_programs_are_syntax_errors(pool, example):
  results = pool.run_batch([(None, example.image), (["def f(): pass"], example.image)])
  assert [r.status for r in results] == ["syntax", "syntax"]
  assert "must be a str" in results[1].error


def test_prepare_program_reports_compiler_errors_as_syntax():
  with pytest.raises(ProgramRejected) as info:
    sandbox.prepare_program("def f():\n  pass\nbreak\n")
  assert info.value.kind == "syntax" and "outside loop" in info.value.message


@pytest.mark.parametrize("value, text", [
    (True, "yes"), (False, "no"), (np.bool_(True), "yes"), (3, "3"), (3.0, "3"), (2.5, "2.5"),
    (np.int64(4), "4"), (np.float32(2.0), "2"), ("red", "red"), ([1, 2], "[1, 2]"),
])
def test_answer_to_text(value, text):
  assert sandbox.answer_to_text(value) == text


def test_answer_to_text_rejects_none_and_overlong():
  with pytest.raises(ValueError, match="returned None"):
    sandbox.answer_to_text(None)
  with pytest.raises(ValueError, match="characters"):
    sandbox.answer_to_text("x" * (sandbox.MAX_ANSWER_CHARS + 1))


def test_constructor_validates_arguments():
  with pytest.raises(ValueError, match="num_workers"):
    ProgramExecutor(num_workers=0)
  with pytest.raises(ValueError, match="start_method"):
    ProgramExecutor(start_method="fork")
  with pytest.raises(ValueError, match="memory_mb"):
    ProgramExecutor(memory_mb=0)
  with pytest.raises(ValueError, match="namespace_factory"):
    ProgramExecutor(namespace_factory="no_colon")


# -- running programs ---------------------------------------------------------------------


def test_reference_program_answers_and_traces(pool, example):
  result = pool.run(example.program, example.image)
  assert isinstance(result, ExecutionResult)
  assert result.status == "ok", result.error
  assert result.answer in example.answers
  assert result.trace and {"call", "tool", "args", "result", "box", "time_s"} <= set(result.trace[0])


def test_answers_are_normalised(pool, example):
  programs = [_body("return True"), _body("return 3.0"), _body("return [1, 2]"),
              _body("return None"), _body("return ImagePatch(image).count('shape') == -1")]
  results = pool.run_batch([(p, example.image) for p in programs])
  assert [r.answer for r in results] == ["yes", "3", "[1, 2]", None, "no"]
  assert results[3].status == "exception" and "returned None" in results[3].error


def test_exception_reports_program_line(pool, example):
  result = pool.run(_body("x = 1", "y = [x]", "return y[3]"), example.image)
  assert (result.status, result.line) == ("exception", 4)
  assert result.error.startswith("IndexError")


def test_trace_strings_are_bounded(pool, example):
  program = _body("p = ImagePatch(image)", "big = 'shape' + ' ' * 100000",
                  "return len(p.find(big))")
  result = pool.run(program, example.image)
  assert result.status == "ok" and len(result.trace) == 1
  assert len(result.trace[0]["args"]["object_name"]) == sandbox.MAX_TRACE_STR_CHARS


def test_print_is_captured_not_written(pool, example, capfd):
  result = pool.run(_body("print('hello', 42)", "return 1"), example.image)
  assert result.output == "hello 42\n"
  assert "hello" not in capfd.readouterr().out


def test_batch_keeps_order_and_sends_each_image_to_the_right_job():
  images = [np.full((8, 8, 3), i, np.uint8) for i in range(40)]
  program = _body("return int(image[0, 0, 0])")
  jobs = [(program, images[(7 * i) % 40]) for i in range(200)]
  # A cache smaller than the number of images makes workers evict and receive images again.
  with ProgramExecutor(num_workers=2, image_cache_size=3, chunk_size=5) as ex:
    results = ex.run_batch(jobs)
  assert [r.answer for r in results] == [str((7 * i) % 40) for i in range(200)]


def test_program_cannot_change_the_image_for_later_programs(pool, example):
  before = example.image.copy()
  results = pool.run_batch([(_body("image[:] = 0", "return int(image.sum())"), example.image),
                            (_body("return int(image.sum())"), example.image)])
  assert results[0].answer == "0"
  assert results[1].answer == str(int(before.sum())) != "0"
  np.testing.assert_array_equal(example.image, before)


def test_namespace_holds_only_the_api(pool, example):
  result = pool.run(_body("return np.zeros(3)"), example.image)
  assert result.status == "exception" and "'np'" in result.error


def test_cpu_time_limit_stops_python_loops(example):
  with ProgramExecutor(num_workers=1, timeout_s=10.0, cpu_time_s=0.3) as ex:
    start = time.monotonic()
    result = ex.run(_body("while True:", "    pass"), example.image)
  assert result.status == "timeout" and "CPU-time" in result.error
  assert result.line in (2, 3)  # inside the loop
  assert time.monotonic() - start < 5.0


def test_stuck_worker_is_killed_and_replaced(pool, example):
  pids = pool.worker_pids()
  results = pool.run_batch([(_body("return sum(range(10 ** 13))"), example.image),
                            (hostile_programs.valid_program(), example.image)])
  assert results[0].status == "timeout" and "killed" in results[0].error
  assert results[1].status == "ok"
  assert pool.worker_pids() != pids


def test_dead_workers_are_replaced_and_their_jobs_rerun(example):
  valid = hostile_programs.valid_program()
  crash = {name: _body(f"{name}()", "return 'x'")
           for name in ("crash_exit", "crash_segfault", "crash_kill")}
  jobs = [valid, crash["crash_exit"], valid, valid, crash["crash_segfault"], valid,
          crash["crash_kill"], valid, valid]
  with ProgramExecutor(num_workers=2, namespace_factory=_TEST_NAMESPACE, chunk_size=4) as ex:
    results = ex.run_batch([(p, example.image) for p in jobs])
    after = ex.run(valid, example.image)
  statuses = [r.status for r in results]
  assert statuses == ["ok", "exception", "ok", "ok", "exception", "ok", "memory", "ok", "ok"]
  assert "exit code 3" in results[1].error
  assert "SIGSEGV" in results[4].error
  assert "SIGKILL" in results[6].error
  assert after.status == "ok"


def test_idle_worker_takes_jobs_queued_behind_a_slow_one(example):
  slow = _body("while True:", "    pass")
  quick = _body("return worker_pid()")
  with ProgramExecutor(num_workers=2, timeout_s=1.0, cpu_time_s=1.0, chunk_size=16,
                       namespace_factory=_TEST_NAMESPACE) as ex:
    # 9 jobs: one worker gets the slow job and 4 quick ones, the other 4 quick ones. On a loaded
    # machine the idle worker may take the slow job itself before the other one has started it
    # (then both run quick jobs); the scenario repeats until the slow job starts where it was sent.
    for _ in range(3):
      ex.run_batch([(quick, example.image)] * 4)  # both workers up
      pids = ex.worker_pids()
      results = ex.run_batch([(slow, example.image)] + [(quick, example.image)] * 8)
      assert results[0].status == "timeout"
      answers = {r.answer for r in results[1:]}
      assert all(r.status == "ok" for r in results[1:]) and answers <= {str(p) for p in pids}
      if len(answers) == 1:
        break
  assert len(answers) == 1  # the worker stuck on the slow job ran none of them


def test_worker_start_failure_names_the_factory():
  with ProgramExecutor(num_workers=1, namespace_factory="no_such_module_xyz:make") as ex:
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
      ex.run(hostile_programs.valid_program(), np.zeros((4, 4, 3), np.uint8))


def test_close_removes_worker_directories_and_refuses_work(example):
  ex = ProgramExecutor(num_workers=1)
  assert ex.run(hostile_programs.valid_program(), example.image).status == "ok"
  worker_dirs = os.listdir(ex.root)
  ex.close()
  assert len(worker_dirs) == 1 and not os.path.exists(ex.root)
  with pytest.raises(RuntimeError, match="closed"):
    ex.run(hostile_programs.valid_program(), example.image)


# -- the hostile corpus -------------------------------------------------------------------


def test_hostile_corpus_has_enough_programs_with_valid_statuses():
  names = [name for name, *_ in hostile_programs.PROGRAMS]
  assert len(names) >= 60 and len(set(names)) == len(names)
  assert {status for _, _, status, _ in hostile_programs.PROGRAMS} == set(executor_lib.STATUSES)


def test_hostile_corpus_gets_expected_statuses_and_writes_nothing(tmp_path, monkeypatch,
                                                                   example):
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  monkeypatch.chdir(workdir)
  home = os.path.expanduser("~")
  home_before = set(os.listdir(home))
  with ProgramExecutor(num_workers=2, timeout_s=1.0, cpu_time_s=1.0, memory_mb=256) as ex:
    jobs = [(program, example.image) for _, program, _, _ in hostile_programs.PROGRAMS]
    results = ex.run_batch(jobs)
    # The workers' own directories (replaced workers' ones are gone already) stay empty too.
    leftovers = [os.path.join(d, name) for d, _, names in os.walk(ex.root) for name in names]
    after = ex.run(hostile_programs.valid_program(), example.image)
  mismatches = []
  for (name, _, status, needle), result in zip(hostile_programs.PROGRAMS, results):
    if result.status != status or (needle and needle not in (result.error or "")):
      mismatches.append((name, status, needle, result.status, result.error))
    if status != "ok":
      assert result.answer is None, name
  assert not mismatches, mismatches
  assert after.status == "ok"  # the pool survived the corpus
  assert leftovers == []
  assert list(workdir.iterdir()) == []
  assert set(os.listdir(home)) - home_before == set()
  assert not os.path.exists(ex.root)
