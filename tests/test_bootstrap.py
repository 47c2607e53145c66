"""infra.bootstrap against a real S3 endpoint (moto's standalone server over HTTP on
loopback), and the IAM policies of infra.iam read as IAM would read them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from infra import iam
from infra.bootstrap import MULTIPART_RULE_ID, SEGMENTS_RULE_ID, SEGMENTS_SUBPREFIX, rule_id
from tests.s3server import AWS_ENV_TO_CLEAR, fake_aws_env, moto_server, unique_bucket

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-2"


@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(endpoint, monkeypatch) -> dict:
    """Environment for the CLI subprocess and for this process's boto3: the test server only."""
    for name in AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    env = fake_aws_env(endpoint, region=REGION)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **env}


@pytest.fixture
def s3(aws_env):
    return boto3.session.Session(region_name=REGION).client("s3")


def bootstrap(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.bootstrap", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def actions(stdout: str) -> dict[str, str]:
    """{setting: action} from the CLI's report lines."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(bucket|encryption|public access|ownership|lifecycle)\s+(would \w+|\w+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_creates_once_then_changes_nothing(aws_env, s3):
    bucket = unique_bucket("ff-boot")
    uri = f"s3://{bucket}/renders"

    first = bootstrap(aws_env, uri, "--region", REGION, "--segments-expire-days", "5")
    assert first.returncode == 0, first.stderr
    assert set(actions(first.stdout).values()) == {"created"}, first.stdout

    second = bootstrap(aws_env, uri, "--region", REGION, "--segments-expire-days", "5")
    assert second.returncode == 0, second.stderr
    assert set(actions(second.stdout).values()) == {"unchanged"}, second.stdout
    assert "nothing changed" in second.stdout

    # The state the report claims, read back from the server.
    assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] == REGION
    (enc,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert enc["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    pab = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert pab == {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                   "RestrictPublicBuckets": True}
    (own,) = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert own["ObjectOwnership"] == "BucketOwnerEnforced"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    segments, multipart = rule_id(SEGMENTS_RULE_ID, "renders"), rule_id(MULTIPART_RULE_ID, "renders")
    assert rules[segments]["Filter"] == {"Prefix": f"renders/{SEGMENTS_SUBPREFIX}"}
    assert rules[segments]["Expiration"] == {"Days": 5}
    assert rules[multipart]["Filter"] == {"Prefix": "renders/"}
    assert rules[multipart]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_check_changes_nothing_and_says_what_would(aws_env, s3):
    bucket = unique_bucket("ff-check")
    uri = f"s3://{bucket}/p"
    before = bootstrap(aws_env, uri, "--region", REGION, "--check")
    assert before.returncode == 1
    assert actions(before.stdout)["bucket"] == "would create"
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    assert bootstrap(aws_env, uri, "--region", REGION).returncode == 0
    after = bootstrap(aws_env, uri, "--region", REGION, "--check")
    assert after.returncode == 0 and "up to date" in after.stdout


def test_fixes_only_what_differs_and_keeps_other_rules(aws_env, s3):
    bucket = unique_bucket("ff-fix")
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    foreign = {"ID": "someone-elses-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
               "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [foreign]})
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": False,
        "RestrictPublicBuckets": True})

    run = bootstrap(aws_env, f"s3://{bucket}/jobs", "--region", REGION)
    assert run.returncode == 0, run.stderr
    got = actions(run.stdout)
    assert got["bucket"] == "unchanged"
    assert got["public access"] == "changed" and got["lifecycle"] == "changed"
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]["BlockPublicPolicy"]
    ids = [r["ID"] for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]]
    assert sorted(ids) == sorted(["someone-elses-logs", rule_id(SEGMENTS_RULE_ID, "jobs"),
                                  rule_id(MULTIPART_RULE_ID, "jobs")])

    # A different expiry is a change to framefarm's rule only; then it is stable again.
    run = bootstrap(aws_env, f"s3://{bucket}/jobs", "--region", REGION, "--segments-expire-days", "2")
    assert actions(run.stdout)["lifecycle"] == "changed" and "updated " + rule_id(SEGMENTS_RULE_ID, "jobs") in run.stdout
    run = bootstrap(aws_env, f"s3://{bucket}/jobs", "--region", REGION, "--segments-expire-days", "2")
    assert set(actions(run.stdout).values()) == {"unchanged"}, run.stdout


def test_two_prefixes_of_one_bucket_keep_their_own_rules(aws_env, s3):
    bucket = unique_bucket("ff-two")
    for prefix in ("teamA", "teamB"):
        assert bootstrap(aws_env, f"s3://{bucket}/{prefix}", "--region", REGION).returncode == 0
    again = bootstrap(aws_env, f"s3://{bucket}/teamA", "--region", REGION)
    assert set(actions(again.stdout).values()) == {"unchanged"}, again.stdout
    filters = {r["Filter"]["Prefix"] for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert filters == {"teamA/", f"teamA/{SEGMENTS_SUBPREFIX}", "teamB/", f"teamB/{SEGMENTS_SUBPREFIX}"}


def test_refuses_a_bucket_in_another_region(aws_env, s3):
    bucket = unique_bucket("ff-west")
    west = boto3.session.Session(region_name="us-west-2").client("s3")
    west.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    run = bootstrap(aws_env, f"s3://{bucket}/p", "--region", REGION)
    assert run.returncode != 0 and "us-west-2" in run.stderr


def test_lifecycle_rule_covers_where_workers_write_segments():
    from actors.protocol import Shard, segment_key

    key = segment_key("f" * 16, Shard(index=3, start=10, stop=20, context_start=0), "mp4")
    assert key.startswith(SEGMENTS_SUBPREFIX), key


# -- IAM ---------------------------------------------------------------------------------

def iam_matches(pattern: str, value: str) -> bool:
    """IAM's wildcard matching for ARNs and StringLike: * any run of characters, ? one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value) is not None


def allowed(policy: dict, action: str, resource: str, s3_prefix: str | None = None) -> bool:
    """Would the policy allow this S3 request? (Allow statements only; it has no Deny.)"""
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if not any(iam_matches(a, action) for a in acts) or not any(iam_matches(r, resource) for r in res):
            continue
        cond = st.get("Condition", {})
        if "StringLike" in cond:
            (key, pats), = cond["StringLike"].items()
            assert key == "s3:prefix"
            if s3_prefix is None or not any(iam_matches(p, s3_prefix) for p in pats):
                continue
        return True
    return False


def test_policy_grants_nothing_outside_its_prefix():
    bucket, prefix = "ff-data", "team/renders"
    policy = iam.s3_policy(bucket, prefix)
    bucket_arn = f"arn:aws:s3:::{bucket}"
    for st in policy["Statement"]:
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all(a.startswith("s3:") and "*" not in a and "?" not in a for a in acts), acts
        res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        for r in res:
            if r == bucket_arn:  # bucket-level (listing): only with a prefix condition under prefix/
                pats = st["Condition"]["StringLike"]["s3:prefix"]
                assert pats and all(p.startswith(prefix + "/") for p in pats), pats
            else:  # object-level: only objects under prefix/
                assert r == f"{bucket_arn}/{prefix}/*", r

    obj = f"{bucket_arn}/{prefix}"
    assert allowed(policy, "s3:GetObject", f"{obj}/job1/latents.safetensors")
    assert allowed(policy, "s3:PutObject", f"{obj}/job1/segments/abc/00000_0-10_c0.mp4")
    assert allowed(policy, "s3:ListBucket", bucket_arn, s3_prefix=f"{prefix}/job1/segments/")
    for outside in (f"{bucket_arn}/{prefix}-old/x", f"{bucket_arn}/team/other/x", f"{bucket_arn}/x",
                    f"arn:aws:s3:::ff-data-2/{prefix}/x", f"{bucket_arn}/{prefix}"):
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert not allowed(policy, action, outside), (action, outside)
    for listing in (None, "", "team/", f"{prefix}-old/", "other/"):
        assert not allowed(policy, "s3:ListBucket", bucket_arn, s3_prefix=listing), listing
    for action in ("s3:PutBucketPolicy", "s3:DeleteBucket", "s3:PutObjectAcl", "s3:ListAllMyBuckets"):
        assert not allowed(policy, action, bucket_arn, s3_prefix=f"{prefix}/x")
        assert not allowed(policy, action, f"{obj}/x")


def test_policy_with_a_kms_key_adds_only_that_key_through_s3():
    key = "arn:aws:kms:us-east-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    (extra,) = [st for st in iam.s3_policy("ff-data", "p", kms_key_arn=key)["Statement"]
                if st["Sid"].startswith("UseTheBucketKey")]
    assert extra["Resource"] == key
    assert extra["Condition"] == {"StringEquals": {"kms:ViaService": "s3.us-east-2.amazonaws.com"}}


@pytest.mark.parametrize("prefix", ["", "/", "a*", "a?b", "a//b"])
def test_policy_refuses_prefixes_it_cannot_scope(prefix):
    with pytest.raises(ValueError):
        iam.s3_policy("ff-data", prefix)


def test_head_policy_is_scoped_to_the_cluster_and_the_worker_role():
    role = "arn:aws:iam::123456789012:role/framefarm-worker"
    policy = iam.head_policy(role, "us-east-2", "framefarm")
    for st in policy["Statement"]:
        assert all("*" not in a for a in st["Action"]), st
        changes = {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"} & set(st["Action"])
        if changes:
            assert st["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "framefarm"}}
        if "iam:PassRole" in st["Action"]:
            assert st["Resource"] == role
        if st["Resource"] == "*":
            assert st["Condition"]["StringEquals"]["aws:RequestedRegion"] == "us-east-2"


def test_iam_cli_prints_the_policy():
    run = subprocess.run([sys.executable, "-m", "infra.iam", "s3://ff-data/renders"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == iam.s3_policy("ff-data", "renders")
