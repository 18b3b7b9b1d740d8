"""The kubelet's pod-resources API (k8s.io/kubelet/pkg/apis/podresources/v1): governor's
own definition of the part it reads (api.proto: the List call, with the kubelet's names
and field numbers) and the code grpcio-tools generated from it (api_pb2.py,
api_pb2_grpc.py), committed so that the daemon needs no code generator. Regenerate with

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \\
        governor/host/podresources/api.proto

from the repository root; tests/test_kubernetes_host.py checks the committed files are
what that produces. Imported only by governor/host/kubernetes.py, and only when
`[kubernetes] discover` is on."""
