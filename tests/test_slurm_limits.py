"""SLURM's submission limits and how a sweep's tasks are split into arrays (harness/sweep/slurm_limits.py):
parsing what scontrol prints and planning the arrays, without a cluster. The split on a real cluster with a
small MaxArraySize: tests/test_slurm_sweep.py."""

import pytest

from harness.core.errors import SweepError
from harness.sweep.slurm_limits import Limits, array_limit, describe_arrays, parse_assoc_mgr, parse_config, plan_arrays

# Lines of `scontrol show config` as SLURM 22.05 prints them (the test cluster's, MaxArraySize=5).
CONFIG = """Configuration data as of 2026-12-01T21:12:00
MaxArraySize            = 5
MaxJobCount             = 10000
SchedulerParameters     = (null)
SLURM_VERSION           = 22.05.8
"""
# `scontrol -o show assoc_mgr users=u flags=assoc`: one record per line, Limit(in use), N for no limit.
ASSOC = ("ClusterName=c Account=lab UserName= Partition= Priority=0 ID=2 GrpJobs=N(3) GrpSubmitJobs=40(30) "
         "MaxJobs= MaxSubmitJobs=N(30)\n"
         "ClusterName=c Account=lab UserName=u(1000) Partition= Priority=0 ID=3 GrpSubmitJobs=N(12) "
         "MaxJobs=8(2) MaxSubmitJobs=100(12)\n")


def test_max_array_size_and_max_array_tasks_from_scontrol_show_config():
    config = parse_config(CONFIG)
    assert config["MaxArraySize"] == "5" and config["SLURM_VERSION"] == "22.05.8"
    assert array_limit(config) == (5, "MaxArraySize = 5")
    assert array_limit({}) == (1001, "MaxArraySize = 1001")  # slurm.conf(5)'s default
    capped = {"MaxArraySize": "100001", "SchedulerParameters": "bf_continue,max_array_tasks=1000"}
    assert array_limit(capped)[0] == 1000


def test_submit_limits_and_their_use_from_assoc_mgr():
    found = parse_assoc_mgr(ASSOC, ("MaxSubmitJobs", "GrpSubmitJobs"))
    assert ("GrpSubmitJobs", 40, 30, "association of account lab") in found  # the account's, shared
    assert ("MaxSubmitJobs", 100, 12, "association of account lab, user u") in found
    assert len(found) == 2  # N: no limit
    assert parse_assoc_mgr("Current Association Manager state\nNo associations currently cached in Slurm.\n",
                           ("MaxSubmitJobs",)) == []  # no accounting: no limit (the test cluster's case)


def test_arrays_stay_within_max_array_size():
    limits = Limits(max_array_tasks=5, array_source="MaxArraySize = 5")
    arrays = plan_arrays(12, limits)
    assert [list(a) for a in arrays] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert max(len(a) for a in arrays) <= 5  # so every array's indices are 0..4 = MaxArraySize - 1
    assert plan_arrays(1080, Limits(max_array_tasks=1001))[1] == range(1001, 1080)  # table1 at SLURM's default
    assert len(plan_arrays(5, limits)) == 1
    text = describe_arrays(arrays, limits, 16)
    assert text.startswith("3 arrays of 5, 5, 2 tasks (MaxArraySize = 5: at most 5 tasks per array")
    assert "--dependency=afterany" in text and "at most 16 tasks run at once" in text


def test_unknown_limits_keep_one_array_and_say_so():
    limits = Limits(notes=["scontrol not found"])
    assert plan_arrays(1080, limits) == [range(1080)]
    text = describe_arrays([range(1080)], limits, 16)
    assert "1 array of 1080 tasks" in text and "limits are unknown (scontrol not found)" in text


def test_too_many_tasks_for_the_submit_limit_is_a_one_line_refusal():
    limits = Limits(max_array_tasks=1001, submit_room=88, submit_source="MaxSubmitJobs=100 of the association (12 in use)")
    with pytest.raises(SweepError) as e:
        plan_arrays(1080, limits)
    msg = str(e.value)
    assert "\n" not in msg and "MaxSubmitJobs=100" in msg and "slurm.runs_per_task: 13" in msg
    assert len(plan_arrays(88, limits)) == 1
    with pytest.raises(SweepError, match="takes no job arrays"):
        plan_arrays(3, Limits(max_array_tasks=0, array_source="MaxArraySize = 0"))
