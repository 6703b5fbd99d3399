"""``python -m hrtem_core.buckets create s3://BUCKET``: the bucket an MLflow server keeps its artifacts in (or datasets
go to), created on any S3-compatible store without Docker or the AWS CLI.

Credentials and endpoint come from the usual AWS variables, as for every other S3 client of the project:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (MinIO, moto, Ceph; unset for AWS itself) and
``AWS_DEFAULT_REGION``. A bucket that is already there and ours is fine (the command can be run again).
"""

from __future__ import annotations

import os
import sys

from .cli import ArgumentParser, run_command
from .errors import InputError


def bucket_name(url: str) -> str:
    """The bucket of ``s3://BUCKET`` (a path after it is allowed: ``s3://BUCKET/mlflow``)."""
    if not url.startswith("s3://") or not url[len("s3://"):].split("/")[0]:
        raise InputError(f"bucket {url!r}: not an S3 URL; give s3://BUCKET")
    return url[len("s3://"):].split("/")[0]


def create_bucket(url: str) -> str:
    """Create the bucket of ``url`` unless it exists; a line saying which."""
    import boto3
    import botocore.exceptions as bx

    name = bucket_name(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    s3 = boto3.client("s3", region_name=region)
    try:
        if _exists(s3, name):
            return f"bucket s3://{name} exists on {endpoint}"
        if region == "us-east-1":  # the one region S3 refuses a location constraint for
            s3.create_bucket(Bucket=name)
        else:
            s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    except bx.NoCredentialsError:
        raise InputError(f"bucket s3://{name}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(and AWS_ENDPOINT_URL for MinIO or another S3-compatible store)") from None
    except bx.EndpointConnectionError:
        raise InputError(f"bucket s3://{name}: cannot reach {endpoint}: start the S3 server, or set AWS_ENDPOINT_URL "
                         "to its address") from None
    except bx.ClientError as exc:
        raise InputError(f"bucket s3://{name} on {endpoint}: {exc}: check the credentials and the bucket "
                         "name") from None
    return f"bucket s3://{name} created on {endpoint}"


def _exists(s3, name: str) -> bool:
    import botocore.exceptions as bx

    try:
        s3.head_bucket(Bucket=name)
        return True
    except bx.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            return False
        raise


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m hrtem_core.buckets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a bucket unless it exists")
    create.add_argument("url", help="s3://BUCKET (a path after the bucket is ignored)")
    args = parser.parse_args(argv)

    def run(args) -> int:
        print(create_bucket(args.url))
        return 0

    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
