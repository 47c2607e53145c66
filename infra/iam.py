"""Least-privilege IAM policies for a framefarm deployment.

    python -m infra.iam s3://bucket/prefix [--kms-key-arn ARN]      # S3 access: workers and head
    python -m infra.iam --head --worker-role-arn ARN [--region R]   # what the head's autoscaler needs

Two roles, two instance profiles (docs/deploy.md has the aws CLI commands):

  framefarm-worker  the S3 policy only: GPU nodes read latents and weights and write
                    segments, all under one prefix of one bucket.
  framefarm-head    the S3 policy (the driver reads latents headers, the stitcher writes
                    the finished video) plus the head policy: launching, tagging and
                    terminating this cluster's workers. Without an explicit profile Ray
                    would make its own with AmazonEC2FullAccess and AmazonS3FullAccess.

The S3 policy is the template infra/iam_policy.json with the bucket and prefix filled in:
object actions on `arn:aws:s3:::BUCKET/PREFIX/*`, and listing only where the request's
s3:prefix lies under `PREFIX/`. No wildcard actions, nothing outside the prefix.

One consequence to know: without an unconditional s3:ListBucket, S3 answers a HEAD or GET
of a *missing* key with 403 (AccessDenied), not 404 - it will not tell a caller that may
not list the bucket whether a key exists. Code that probes for a key under this policy
must list (`list_objects_v2(Prefix=key)`, which carries s3:prefix) rather than HEAD.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path

from infra.storage import split_uri

TEMPLATE = Path(__file__).with_name("iam_policy.json")

# Ray's AWS provider tags every instance it launches with the cluster's name
# (ray.autoscaler.tags.TAG_RAY_CLUSTER_NAME); the head may only touch instances so tagged.
RAY_CLUSTER_TAG = "ray-cluster-name"

# The AMI is given to RunInstances as `resolve:ssm:<this>/...` (ray_cluster.yaml), which
# needs ssm:GetParameters on the public parameter.
DLAMI_PARAMETERS = "/aws/service/deeplearning/ami/*"

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9!_.'()/-]+$")  # S3's safe key characters; no IAM wildcards


def check_bucket(bucket: str) -> str:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"not a valid S3 bucket name: {bucket!r}")
    return bucket


def check_prefix(prefix: str) -> str:
    """A non-empty prefix without wildcards; surrounding slashes are dropped."""
    prefix = prefix.strip("/")
    if not prefix:
        raise ValueError("a prefix is required (s3://bucket/prefix): the policy is scoped to it")
    if not _PREFIX.match(prefix) or "//" in prefix:
        raise ValueError(
            f"prefix {prefix!r} may hold only letters, digits, / and !_.'()- "
            "(no * or ?, which IAM would read as wildcards)"
        )
    return prefix


def s3_policy(bucket: str, prefix: str, kms_key_arn: str | None = None) -> dict:
    """The S3 policy for `s3://bucket/prefix`, from the JSON template."""
    text = string.Template(TEMPLATE.read_text()).substitute(
        bucket=check_bucket(bucket), prefix=check_prefix(prefix)
    )
    policy = json.loads(text)
    if kms_key_arn:
        # Only for a bucket whose default encryption is SSE-KMS with this key
        # (python -m infra.bootstrap --kms-key ...); SSE-S3, the default, needs nothing.
        if not kms_key_arn.startswith("arn:aws:kms:") or "*" in kms_key_arn:
            raise ValueError(f"--kms-key-arn must be a key ARN (arn:aws:kms:...), got {kms_key_arn!r}")
        region = kms_key_arn.split(":")[3]
        policy["Statement"].append({
            "Sid": "UseTheBucketKeyThroughS3Only",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": kms_key_arn,
            "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}},
        })
    return policy


def head_policy(worker_role_arn: str, region: str, cluster_name: str = "framefarm") -> dict:
    """EC2 permissions for Ray's autoscaler on the head: launch, tag, list, terminate workers.

    Describe* and RunInstances cannot be scoped to resources ahead of time (the instance
    does not exist yet), so they are scoped to the region; everything that changes an
    existing instance is scoped to this cluster's tag.
    """
    if not worker_role_arn.startswith("arn:aws:iam::") or ":role/" not in worker_role_arn:
        raise ValueError(f"--worker-role-arn must be a role ARN (arn:aws:iam::ACCOUNT:role/NAME), "
                         f"got {worker_role_arn!r}")
    in_region = {"StringEquals": {"aws:RequestedRegion": region}}
    own_instances = {"StringEquals": {f"ec2:ResourceTag/{RAY_CLUSTER_TAG}": cluster_name}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Describe",
                "Effect": "Allow",
                "Action": [
                    "ec2:DescribeInstances",
                    "ec2:DescribeInstanceStatus",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeImages",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeSecurityGroups",
                    "ec2:DescribeKeyPairs",
                ],
                "Resource": "*",
                "Condition": in_region,
            },
            {
                "Sid": "LaunchWorkers",
                "Effect": "Allow",
                "Action": ["ec2:RunInstances"],
                "Resource": "*",
                "Condition": in_region,
            },
            {
                "Sid": "TagAtLaunch",
                "Effect": "Allow",
                "Action": ["ec2:CreateTags"],
                "Resource": "*",
                "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances",
                                               "aws:RequestedRegion": region}},
            },
            {
                "Sid": "ManageOwnWorkers",
                "Effect": "Allow",
                "Action": ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances",
                           "ec2:StartInstances"],
                "Resource": f"arn:aws:ec2:{region}:*:instance/*",
                "Condition": own_instances,
            },
            {
                "Sid": "GiveWorkersTheirRole",
                "Effect": "Allow",
                "Action": ["iam:PassRole"],
                "Resource": worker_role_arn,
                "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            },
            {
                "Sid": "ResolveTheAmiParameter",
                "Effect": "Allow",
                "Action": ["ssm:GetParameters", "ssm:GetParameter"],
                "Resource": f"arn:aws:ssm:{region}::parameter{DLAMI_PARAMETERS}",
            },
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.iam", description=__doc__.split("\n\n")[0])
    p.add_argument("uri", nargs="?", help="s3://bucket/prefix the S3 policy is scoped to")
    p.add_argument("--kms-key-arn", help="add use of this KMS key (buckets encrypted with SSE-KMS)")
    p.add_argument("--head", action="store_true", help="print the head's autoscaler policy instead")
    p.add_argument("--worker-role-arn", help="with --head: the role the head passes to workers")
    p.add_argument("--region", default="us-east-2", help="with --head: the cluster's region")
    p.add_argument("--cluster-name", default="framefarm", help="with --head: cluster_name in ray_cluster.yaml")
    args = p.parse_args(argv)
    try:
        if args.head:
            if not args.worker_role_arn:
                p.error("--head needs --worker-role-arn")
            policy = head_policy(args.worker_role_arn, args.region, args.cluster_name)
        else:
            if not args.uri:
                p.error("give s3://bucket/prefix (or --head)")
            scheme, bucket, prefix = split_uri(args.uri)
            if scheme != "s3":
                p.error(f"not an s3:// URI: {args.uri}")
            policy = s3_policy(bucket, prefix, args.kms_key_arn)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json.dump(policy, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
