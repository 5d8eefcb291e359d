# cython: language_level=3
"""C declarations of the OpenSSL 3 (libcrypto) calls used by the compiled data path.

Only what ``_fastpath`` needs: the EVP cipher API for AES-256-GCM and the
error queue. Everything is declared ``nogil``: these functions touch no Python
state, so the packet loops call them with the GIL released. The structs are
opaque in OpenSSL 3, so they are only ever used through pointers.
"""

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass

    ctypedef struct EVP_CIPHER:
        pass

    # Declared in openssl/types.h (included by evp.h); always NULL here.
    ctypedef struct ENGINE:
        pass

    # Control codes for EVP_CIPHER_CTX_ctrl (macros in evp.h).
    enum:
        EVP_CTRL_GCM_SET_IVLEN
        EVP_CTRL_GCM_GET_TAG
        EVP_CTRL_GCM_SET_TAG

    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX* ctx)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX* ctx, int type, int arg, void* ptr)

    const EVP_CIPHER* EVP_aes_256_gcm()

    # All of these return 1 on success. Passing NULL for the cipher and key with
    # a non-NULL IV re-initialises an already keyed context for a new message
    # without redoing the key schedule.
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, ENGINE* impl,
                           const unsigned char* key, const unsigned char* iv)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                          const unsigned char* in_, int inl)
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl)

    int EVP_DecryptInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, ENGINE* impl,
                           const unsigned char* key, const unsigned char* iv)
    int EVP_DecryptUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                          const unsigned char* in_, int inl)
    # Returns <= 0 when the GCM tag does not verify.
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl)


cdef extern from "openssl/err.h" nogil:
    # The error queue is per thread. Failed calls may leave entries in it; we
    # clear them so that they are not misreported later by an unrelated user of
    # libcrypto in the same thread (e.g. Python's hashlib or ssl).
    void ERR_clear_error()
