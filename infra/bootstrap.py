"""Create or check the S3 bucket a framefarm deployment writes to. Safe to run again.

    python -m infra.bootstrap s3://bucket/prefix [--region R] [--segments-expire-days N]
                              [--kms-key KEY] [--check]

Brings the bucket to this state, changing only what differs, and prints one line per
setting with what it did (created / changed / unchanged):

  bucket                 exists, in --region (created there if missing)
  default encryption     SSE-S3 (AES256), or SSE-KMS with --kms-key and an S3 Bucket Key
  public access block    all four settings on
  object ownership       BucketOwnerEnforced (ACLs off: the bucket policy and IAM decide)
  lifecycle              framefarm's two rules (other rules on the bucket are kept):
                         - expire PREFIX/segments/ after N days: the per-shard segments
                           a job writes before stitching (see SEGMENTS_SUBPREFIX)
                         - abort multipart uploads under PREFIX/ left unfinished for a day
                           (a spot node killed mid-upload leaves its parts, billed, forever)

--check changes nothing and exits 1 if anything would change. The endpoint comes from
boto3's usual settings (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so the same command
works against an S3-compatible store or a test server.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from typing import Any

from infra.storage import split_uri

# Where a job's per-shard segments go under its output prefix (actors/worker.py,
# segment_key). The lifecycle rule expires PREFIX/SEGMENTS_SUBPREFIX, so it reaches the
# segments of jobs whose output prefix is the bootstrapped PREFIX itself.
SEGMENTS_SUBPREFIX = "segments/"

SEGMENTS_RULE_ID = "framefarm-expire-segments"
MULTIPART_RULE_ID = "framefarm-abort-incomplete-uploads"


def rule_id(base: str, prefix: str) -> str:
    """A lifecycle rule's ID for one prefix: one bucket may serve several prefixes (one IAM
    policy each), and each bootstrap must keep to its own rules. S3 caps IDs at 255 chars."""
    if not prefix:
        return base
    rid = f"{base}:{prefix.rstrip('/')}"
    return rid if len(rid) <= 255 else f"{base}:{hashlib.sha256(prefix.encode()).hexdigest()[:32]}"
DEFAULT_SEGMENT_DAYS = 7
MULTIPART_DAYS = 1

# What a lifecycle rule can do; two rules that agree on these (and scope, status) are the same.
_RULE_ACTIONS = ("Expiration", "AbortIncompleteMultipartUpload", "Transitions",
                 "NoncurrentVersionExpiration", "NoncurrentVersionTransitions")

PUBLIC_ACCESS_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}


@dataclass
class Outcome:
    setting: str
    action: str  # "created", "changed", "unchanged", or with --check "would create" / "would change"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.setting:<20} {self.action:<13} {self.detail}".rstrip()


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _status(exc: BaseException) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class Bootstrap:
    """One bucket brought to framefarm's settings; each `ensure_*` returns an Outcome."""

    def __init__(self, client: Any, bucket: str, prefix: str, region: str, *,
                 segment_days: int = DEFAULT_SEGMENT_DAYS, kms_key: str | None = None,
                 check: bool = False):
        if segment_days < 1:
            raise ValueError("--segments-expire-days must be at least 1")
        self.s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region
        self.segment_days = segment_days
        self.kms_key = kms_key
        self.check = check

    def _key(self, sub: str) -> str:
        return f"{self.prefix}/{sub}" if self.prefix else sub

    def _did(self, setting: str, was: str, detail: str) -> Outcome:
        """Outcome of a setting that had to change (`was`: created or changed)."""
        return Outcome(setting, f"would {was[:-1]}" if self.check else was, detail)

    def run(self) -> list[Outcome]:
        outcomes = [self.ensure_bucket()]
        if self.check and outcomes[0].action.startswith("would"):
            # Nothing else can be read from a bucket that does not exist yet.
            return outcomes + [Outcome(s, "would create") for s in
                               ("encryption", "public access", "ownership", "lifecycle")]
        return outcomes + [self.ensure_encryption(), self.ensure_public_access_block(),
                           self.ensure_ownership(), self.ensure_lifecycle()]

    # -- bucket -------------------------------------------------------------------------
    def ensure_bucket(self) -> Outcome:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _status(e) == 403 or _code(e) in ("403", "Forbidden", "AccessDenied"):
                raise SystemExit(f"bucket {self.bucket} exists but these credentials may not use it "
                                 "(another account's, or a policy denies it)") from e
            if _status(e) != 404 and _code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            if not self.check:
                kwargs: dict[str, Any] = {"Bucket": self.bucket}
                if self.region != "us-east-1":  # us-east-1 is the one region S3 refuses to be told
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                self.s3.create_bucket(**kwargs)
            return self._did("bucket", "created", f"s3://{self.bucket} in {self.region}")
        location = self.s3.get_bucket_location(Bucket=self.bucket).get("LocationConstraint") or "us-east-1"
        if location != self.region:
            raise SystemExit(f"bucket {self.bucket} is in {location}, not {self.region}: run the cluster "
                             f"in {location} (or pass --region {location}); cross-region reads are "
                             "slower and billed")
        return Outcome("bucket", "unchanged", f"s3://{self.bucket} in {location}")

    # -- default encryption ------------------------------------------------------------------
    def _wanted_encryption(self) -> dict:
        if self.kms_key:
            return {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms",
                                                           "KMSMasterKeyID": self.kms_key},
                    "BucketKeyEnabled": True}  # one data key per bucket-hour, not per object
        return {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}

    def ensure_encryption(self) -> Outcome:
        wanted = self._wanted_encryption()
        algo = wanted["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"]
        detail = f"{algo} key {self.kms_key}" if self.kms_key else "SSE-S3 (AES256)"
        try:
            rules = self.s3.get_bucket_encryption(Bucket=self.bucket)[
                "ServerSideEncryptionConfiguration"]["Rules"]
        except Exception as e:
            if _code(e) != "ServerSideEncryptionConfigurationNotFoundError":
                raise
            rules = []
        current = rules[0] if rules else {}
        same = (current.get("ApplyServerSideEncryptionByDefault") == wanted["ApplyServerSideEncryptionByDefault"]
                and bool(current.get("BucketKeyEnabled")) == bool(wanted.get("BucketKeyEnabled")))
        if same:
            return Outcome("encryption", "unchanged", detail)
        if not self.check:
            self.s3.put_bucket_encryption(Bucket=self.bucket,
                                          ServerSideEncryptionConfiguration={"Rules": [wanted]})
        return self._did("encryption", "changed" if current else "created", detail)

    # -- public access block -------------------------------------------------------------------
    def ensure_public_access_block(self) -> Outcome:
        try:
            current = self.s3.get_public_access_block(Bucket=self.bucket)["PublicAccessBlockConfiguration"]
        except Exception as e:
            if _code(e) != "NoSuchPublicAccessBlockConfiguration":
                raise
            current = None
        if current is not None and all(current.get(k) for k in PUBLIC_ACCESS_BLOCK):
            return Outcome("public access", "unchanged", "all blocked")
        if not self.check:
            self.s3.put_public_access_block(Bucket=self.bucket,
                                            PublicAccessBlockConfiguration=dict(PUBLIC_ACCESS_BLOCK))
        return self._did("public access", "changed" if current else "created", "all blocked")

    # -- object ownership ----------------------------------------------------------------------
    def ensure_ownership(self) -> Outcome:
        try:
            rules = self.s3.get_bucket_ownership_controls(Bucket=self.bucket)["OwnershipControls"]["Rules"]
        except Exception as e:
            if _code(e) != "OwnershipControlsNotFoundError":
                raise
            rules = []
        if [r.get("ObjectOwnership") for r in rules] == ["BucketOwnerEnforced"]:
            return Outcome("ownership", "unchanged", "BucketOwnerEnforced (ACLs off)")
        if not self.check:
            self.s3.put_bucket_ownership_controls(
                Bucket=self.bucket,
                OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
        return self._did("ownership", "changed" if rules else "created", "BucketOwnerEnforced (ACLs off)")

    # -- lifecycle -----------------------------------------------------------------------------
    def wanted_rules(self) -> list[dict]:
        return [
            {"ID": rule_id(SEGMENTS_RULE_ID, self.prefix), "Status": "Enabled",
             "Filter": {"Prefix": self._key(SEGMENTS_SUBPREFIX)},
             "Expiration": {"Days": self.segment_days}},
            {"ID": rule_id(MULTIPART_RULE_ID, self.prefix), "Status": "Enabled",
             "Filter": {"Prefix": self._key("")},
             "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": MULTIPART_DAYS}},
        ]

    @staticmethod
    def _normal(rule: dict) -> dict:
        """What a rule does, in one form: S3 may echo a rule back with empty fields, or in
        the legacy filter-less shape."""
        f = rule.get("Filter")
        scope = rule.get("Prefix") if f is None else (f.get("Prefix") if set(f) <= {"Prefix"} else f)
        out = {"Status": rule.get("Status"), "Prefix": scope or ""}
        out.update({k: rule[k] for k in _RULE_ACTIONS if rule.get(k)})
        return out

    def ensure_lifecycle(self) -> Outcome:
        try:
            rules = self.s3.get_bucket_lifecycle_configuration(Bucket=self.bucket)["Rules"]
        except Exception as e:
            if _code(e) != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        wanted = self.wanted_rules()
        by_id = {r.get("ID"): r for r in rules}
        ours = {w["ID"] for w in wanted}
        added = [w["ID"] for w in wanted if w["ID"] not in by_id]
        changed = [w["ID"] for w in wanted if w["ID"] in by_id and self._normal(by_id[w["ID"]]) != self._normal(w)]
        detail = (f"expire {self._key(SEGMENTS_SUBPREFIX)} after {self.segment_days} d; "
                  f"abort uploads under {self._key('') or '(bucket)'} after {MULTIPART_DAYS} d")
        if not added and not changed:
            return Outcome("lifecycle", "unchanged", detail)
        if not self.check:
            keep = [r for r in rules if r.get("ID") not in ours]  # other tools' rules stay
            self.s3.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": keep + wanted})
        was = "created" if not rules else "changed"
        what = ", ".join([f"added {i}" for i in added] + [f"updated {i}" for i in changed])
        return self._did("lifecycle", was, f"{detail} ({what})")


def s3_client(region: str) -> Any:
    import boto3
    from botocore.config import Config

    # A session of our own; boto3 applies AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself.
    return boto3.session.Session(region_name=region).client(
        "s3", config=Config(retries={"mode": "standard", "max_attempts": 10}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.bootstrap", description=__doc__.split("\n\n")[0])
    p.add_argument("uri", help="s3://bucket/prefix that jobs will read from and write under")
    p.add_argument("--region", help="the bucket's region, which should be the cluster's "
                                    "(default: AWS_REGION / AWS_DEFAULT_REGION / your profile's)")
    p.add_argument("--segments-expire-days", type=int, default=DEFAULT_SEGMENT_DAYS,
                   help=f"days before PREFIX/{SEGMENTS_SUBPREFIX} objects expire "
                        f"(default {DEFAULT_SEGMENT_DAYS}; a job can resume from its segments until then)")
    p.add_argument("--kms-key", help="SSE-KMS with this key id/ARN/alias instead of SSE-S3")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    args = p.parse_args(argv)

    try:
        scheme, bucket, prefix = split_uri(args.uri)
    except ValueError as e:
        p.error(str(e))
    if scheme != "s3":
        p.error(f"not an s3:// URI: {args.uri}")
    import boto3

    region = args.region or boto3.session.Session().region_name
    if not region:
        p.error("no region: pass --region (the cluster's region, e.g. us-east-2)")
    try:
        boot = Bootstrap(s3_client(region), bucket, prefix, region, segment_days=args.segments_expire_days,
                         kms_key=args.kms_key, check=args.check)
    except ValueError as e:
        p.error(str(e))
    outcomes = boot.run()
    for o in outcomes:
        print(o)
    pending = [o for o in outcomes if o.action != "unchanged"]
    if args.check:
        print("check: " + ("up to date" if not pending else f"{len(pending)} setting(s) would change"))
        return 1 if pending else 0
    print("bootstrap: " + ("nothing changed" if not pending else f"{len(pending)} setting(s) changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
