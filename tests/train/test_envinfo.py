"""``ring-attn env``: the launcher's rank layout and the relevant variables, from a given environment."""

import json

from ring_flash_attn.train.envinfo import collect_env, format_env


def test_pals_launch_and_ccl_variables_are_reported():
    environ = {"PMI_RANK": "13", "PMI_SIZE": "24", "PALS_LOCAL_RANKID": "1", "CCL_KVS_MODE": "mpi",
               "FI_PROVIDER": "cxi", "HOME": "/home/someone", "AWS_SECRET_ACCESS_KEY": "never-shown"}
    info = collect_env(environ)
    assert info["ranks"] == {"launcher": "pmi", "rank": 13, "world_size": 24, "local_rank": 1}
    assert info["environment"] == {"CCL_KVS_MODE": "mpi", "FI_PROVIDER": "cxi", "PALS_LOCAL_RANKID": "1",
                                   "PMI_RANK": "13", "PMI_SIZE": "24"}
    assert info["device_type"] == "cpu" and info["dist_backend"] == "gloo"
    assert info["versions"]["torch"]
    json.dumps(info)  # plain data, for `ring-attn env --json` style output
    text = format_env(info)
    assert "launcher=pmi, rank=13, world_size=24, local_rank=1" in text and "CCL_KVS_MODE=mpi" in text
    assert "never-shown" not in text


def test_inconsistent_launcher_variables_are_reported_not_raised():
    info = collect_env({"PMI_RANK": "3"})
    assert "PMI_RANK is set but none of" in info["ranks"]["error"]
