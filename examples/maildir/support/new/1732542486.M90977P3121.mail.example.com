Return-Path: <carol.nguyen@customer.example>
Delivered-To: support@example.com
Received: from mail.customer.example (mail.customer.example [198.51.100.40])
	by mail.example.com with ESMTPS id 4Xy8Dn0QmKz9sZt
	for <support@example.com>; Mon, 25 Nov 2024 13:48:06 +0000
From: Carol Nguyen <carol.nguyen@customer.example>
To: Alice Martin <alice@example.com>
Cc: Example Support <support@example.com>
Subject: Invoice INV-2024-118 does not match quote Q-2024-052
Date: Mon, 25 Nov 2024 14:48:03 +0100
Message-ID: <b7e2c1a09f4d4e63a1c5f0d2e8b94c17@customer.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="----=_Part_8812_1437709211.1732542483"

This is a multi-part message in MIME format.

------=_Part_8812_1437709211.1732542483
Content-Type: multipart/alternative; boundary="----=_Part_8813_402117358.1732542483"

------=_Part_8813_402117358.1732542483
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 7bit

Hi Alice,

Invoice INV-2024-118 (attached as a spreadsheet export) does not match
our quote Q-2024-052:

- the DX-200 unit price is 412.00 EUR on the invoice, 389.00 EUR in the quote
- the installation kit appears twice

Could you send a corrected invoice? Our accounts payable run closes on
Friday 29 November.

I am copying your support address so that this gets a ticket number.

Thanks,
Carol Nguyen
Purchasing, Northwind Traders

------=_Part_8813_402117358.1732542483
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<html>
<head><meta http-equiv=3D"Content-Type" content=3D"text/html; charset=3Dutf=
-8"></head>
<body style=3D"font-family: Calibri, sans-serif; font-size: 11pt;">
<p>Hi Alice,</p>
<p>Invoice <b>INV-2024-118</b> (attached as a spreadsheet export) does not =
match our quote <b>Q-2024-052</b>:</p>
<ul>
<li>the DX-200 unit price is 412.00&nbsp;EUR on the invoice, 389.00&nbsp;EU=
R in the quote</li>
<li>the installation kit appears twice</li>
</ul>
<p>Could you send a corrected invoice? Our accounts payable run closes on F=
riday 29&nbsp;November.</p>
<p>I am copying your support address so that this gets a ticket number.</p>
<p>Thanks,<br>Carol Nguyen<br><span style=3D"color: #666666;">Purchasing, N=
orthwind Traders</span></p>
</body>
</html>

------=_Part_8813_402117358.1732542483--

------=_Part_8812_1437709211.1732542483
Content-Type: text/csv; charset=us-ascii; name="INV-2024-118.csv"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="INV-2024-118.csv"

bGluZSxpdGVtLGRlc2NyaXB0aW9uLHF1YW50aXR5LHVuaXRfcHJpY2VfZXVyLHRvdGFsX2V1cg0K
MSxEWC0yMDAsRFgtMjAwIGNvbnRyb2xsZXIsNDgsNDEyLjAwLDE5Nzc2LjAwDQoyLElLLTEwLElu
c3RhbGxhdGlvbiBraXQsMSwyNDAuMDAsMjQwLjAwDQozLElLLTEwLEluc3RhbGxhdGlvbiBraXQs
MSwyNDAuMDAsMjQwLjAwDQo0LFNISVAsRnJlaWdodCAodHdvIGRlbGl2ZXJpZXMpLDEsMTgwLjAw
LDE4MC4wMA0K
------=_Part_8812_1437709211.1732542483--
