#!/usr/bin/env python3
"""Drives moto's S3 server for the tests (a real S3-protocol server from PyPI, run with
INITIAL_NO_AUTH_ACTION_COUNT so every request after the bootstrap is SigV4-checked).

  s3tool.py bootstrap ENDPOINT            -> prints "ACCESS_KEY SECRET_KEY" of a new IAM user
  s3tool.py put ENDPOINT AK SK BUCKET KEY FILE   (creates the bucket if needed)
  s3tool.py presign ENDPOINT AK SK BUCKET KEY    -> prints a presigned GET URL

TLS endpoints are verified against $S3TOOL_CA when set.
"""
import os
import sys

import boto3
import botocore.config

POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'


def client(service, endpoint, ak, sk):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        verify=os.environ.get("S3TOOL_CA", True),
        config=botocore.config.Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


cmd, endpoint = sys.argv[1], sys.argv[2]
if cmd == "bootstrap":
    # The three requests moto lets through unauthenticated.
    iam = client("iam", endpoint, "bootstrap", "bootstrap")
    iam.create_user(UserName="importer")
    iam.put_user_policy(UserName="importer", PolicyName="all", PolicyDocument=POLICY)
    k = iam.create_access_key(UserName="importer")["AccessKey"]
    print(k["AccessKeyId"], k["SecretAccessKey"])
elif cmd == "put":
    ak, sk, bucket, key, path = sys.argv[3:8]
    s3 = client("s3", endpoint, ak, sk)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3.upload_file(path, bucket, key)
elif cmd == "presign":
    ak, sk, bucket, key = sys.argv[3:7]
    s3 = client("s3", endpoint, ak, sk)
    print(s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600))
else:
    sys.exit("unknown command " + cmd)
